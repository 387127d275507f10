"""``make bench-gpu`` (``benchmarks/gpu.py``) skips cleanly without CUDA and writes its page with
the device name; nothing here needs a GPU."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def gpu():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "gpu.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = mod  # dataclasses look their module up
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop("bench_gpu", None)


def test_without_cuda_it_skips_and_writes_nothing(gpu, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "page.md"
    assert gpu.main(["--out", str(out)]) == 0
    assert "no CUDA device" in capsys.readouterr().out
    assert not out.exists()


def test_page_names_the_device_and_every_step(gpu):
    steps = gpu.steps(dry_run=False)
    assert [s.timeout for s in steps] and sum(s.timeout for s in steps) <= 8 * 60
    results = [(s, f"output of step {k}", 1.0, 0) for k, s in enumerate(steps)]
    page = gpu.render("NVIDIA H100 80GB HBM3", results, dry_run=False)
    assert "NVIDIA H100 80GB HBM3" in page
    for k, s in enumerate(steps):
        assert s.title in page and f"output of step {k}" in page
    assert "--compile" in page and "vgg16,resnet50" in page


def test_dry_run_never_writes_to_docs(gpu):
    with pytest.raises(SystemExit):
        gpu.main(["--dry-run"])
