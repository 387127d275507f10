"""One run's output folder at a time: a lock on ``--out`` and a staged probe folder.

* **Lock.** A run holds ``OUT/.convlens.lock`` (``fcntl.flock``, exclusive) while it writes. A
  second run on the same ``--out`` — another terminal, another job — is refused at once with a
  one-line error (exit 2) naming the folder, rather than interleaving its files with the first
  run's. The lock is re-entrant within a process (``convlens demo`` holds it across its probes)
  and released by the OS if the process dies.
* **Staging.** A probe writes into ``OUT/.<probe>.staging-<pid>/``; only when it has finished
  (files, figures, ``section.json``, ``run.json``) is the folder swapped in for ``OUT/<probe>/``
  (rename the old one aside, rename the new one in, delete the old one). So ``OUT/<probe>/``
  always holds exactly one complete run's files — re-running with fewer images leaves no
  leftovers — and a failed or interrupted run changes nothing (its staging folder is removed, or,
  after a kill, swept by the next run that takes the lock).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from convlens.errors import ConvlensError

__all__ = ["output_lock", "staged_dir", "LOCK_NAME"]

LOCK_NAME = ".convlens.lock"
_held: dict[str, tuple[int, int]] = {}  # resolved out folder -> (fd, depth)


def _sweep(out: Path) -> None:
    """Remove staging and set-aside folders left by killed runs (only called under the lock)."""
    for p in out.glob(".*.staging-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in out.glob(".*.old-*"):
        shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def output_lock(out: str | os.PathLike) -> Iterator[Path]:
    """Hold the lock of the output folder ``out`` (created) for the duration of the block."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    key = str(out.resolve())
    if key in _held:  # re-entrant within this process
        fd, depth = _held[key]
        _held[key] = (fd, depth + 1)
        try:
            yield out
        finally:
            fd, depth = _held[key]
            _held[key] = (fd, depth - 1)
        return
    import fcntl

    path = out / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ConvlensError(
            f"--out {out}: another convlens run is writing there ({path} is locked); wait for "
            "it to finish or choose another --out"
        ) from None
    _held[key] = (fd, 1)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _sweep(out)
        yield out
    finally:
        del _held[key]
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextlib.contextmanager
def staged_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh staging folder next to ``final``; when the block succeeds, swap it in for
    ``final`` (the previous contents are gone); when it raises, remove it and leave ``final``
    untouched. Call it under :func:`output_lock`."""
    final = Path(final)
    staging = final.parent / f".{final.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)
