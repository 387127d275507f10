"""matplotlib's import on a background thread while the model is built (``render.preload``)."""

from __future__ import annotations

import subprocess
import sys
import threading

_SCRIPT = """
import sys, threading
from convlens.render import preload
assert "matplotlib" not in sys.modules
assert preload.start() is True
assert preload.start() is False  # once per process
preload.wait()
assert all(m in sys.modules for m in preload.MODULES)
assert not any(t.name == "convlens-preload" and t.is_alive() for t in threading.enumerate())
print("ok")
"""


def test_start_imports_what_the_figures_need_once_and_wait_joins():
    res = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def test_a_run_leaves_no_preload_thread_behind(tmp_path, monkeypatch):
    """``run_probe`` starts the import before building the model and joins it, also when the
    model cannot be built: the import here ends only 0.3 s after the model fails."""
    import pytest

    from convlens import runner
    from convlens.errors import ConvlensError
    from convlens.render import preload

    release = threading.Event()
    monkeypatch.setattr(preload, "_thread", None)
    monkeypatch.setattr(preload, "MODULES", ("convlens_not_a_module_xyz",))
    monkeypatch.setattr(preload, "_import", lambda: release.wait(10))

    def failing_model(*args, **kwargs):
        threading.Timer(0.3, release.set).start()
        raise ConvlensError("model 'x': cannot be built")

    monkeypatch.setattr(runner, "load_model", failing_model)
    with pytest.raises(ConvlensError, match="cannot be built"):
        runner.run_probe("occlusion", "x", out=tmp_path / "o")
    assert preload._thread is not None  # it was started
    assert not preload._thread.is_alive()  # and joined before the error left the run
