"""The command ends without the interpreter's teardown (``cli._fast_exit``), keeping what an
ordinary exit guarantees: exit status, ``atexit`` handlers, flushed output."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

_SCRIPT = """
import atexit, sys
atexit.register(lambda: print("atexit ran"))  # buffered: only a flush makes it appear
sys.stdout.write("unflushed ")
sys.argv = ["convlens", *sys.argv[1:]]
from convlens.cli import main
main()
print("not reached")
"""


def _run(*args: str, fast: str = "1") -> subprocess.CompletedProcess:
    env = dict(os.environ, CONVLENS_FAST_EXIT=fast, CONVLENS_NO_PROGRESS="1")
    return subprocess.run([sys.executable, "-c", _SCRIPT, *args], capture_output=True,
                          text=True, env=env, timeout=300)  # fmt: skip


def test_fast_exit_keeps_status_atexit_handlers_and_buffered_output():
    from convlens import __version__

    ok = _run("--version")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("unflushed ") and f"convlens {__version__}" in ok.stdout
    assert ok.stdout.rstrip().endswith("atexit ran") and "not reached" not in ok.stdout
    bad = _run("probe", "occlusion", "--model", "no_such_model_xyz")
    assert bad.returncode == 2 and "no_such_model_xyz" in bad.stderr
    assert bad.stdout.rstrip().endswith("atexit ran")


def test_the_ordinary_exit_when_asked_or_called_with_arguments():
    plain = _run("--version", fast="0")
    assert plain.returncode == 0 and plain.stdout.rstrip().endswith("atexit ran")
    from convlens.cli import main

    with pytest.raises(SystemExit) as exc:  # from Python: SystemExit, never os._exit
        main(["--version"])
    assert exc.value.code == 0
