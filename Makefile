# The two commands of the README: `make demo` and `make test`. Both create .venv if missing.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= convlens-out

.PHONY: demo test lint install clean bench-gpu

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Re-install when the project's metadata changes (new entry points, new dependencies).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/convlens demo --out $(OUT)

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest

# Every GPU measurement of issue #16 in one go (< 8 min on one H100/H200); writes
# docs/benchmarks-gpu.md with the device name. Without CUDA it says so and writes nothing.
bench-gpu: $(VENV)/.installed-test
	$(BIN)/python benchmarks/gpu.py

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(OUT) .pytest_cache build dist *.egg-info
