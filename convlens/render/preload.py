"""Import matplotlib on a background thread while the model is being built.

Every probe labels its figures with matplotlib, whose import costs 0.5–1 s on two cores, all of it
Python on one core. Building the model is mostly ATen work (random initialisation, reading
weights) that releases the GIL, so :func:`start` at the beginning of a run hides the import behind
it; :func:`wait` (called by the runner as soon as the model is built, or has failed to build)
joins the thread, so no two threads ever import matplotlib at once and no import outlives the
model's creation. Measured on vgg16 (2 cores): model creation 5.72 s then the import 0.87 s in sequence, 5.82 s
for both together.

A failed import here is silent: the figure code imports matplotlib itself and reports it there.
"""

from __future__ import annotations

import sys
import threading

__all__ = ["start", "wait"]

#: What the figure code imports (``Figure`` + the Agg canvas, colormaps, patches).
MODULES = (
    "matplotlib",
    "matplotlib.figure",
    "matplotlib.backends.backend_agg",
    "matplotlib.cm",
    "matplotlib.colors",
    "matplotlib.patches",
)

_thread: threading.Thread | None = None
_lock = threading.Lock()


def _import() -> None:
    import importlib

    try:
        for name in MODULES:
            importlib.import_module(name)
    except Exception:  # noqa: BLE001 - reported by the figure code's own import
        pass


def start() -> bool:
    """Begin importing matplotlib on a daemon thread, once per process; False when there is
    nothing to do (already imported or already started)."""
    global _thread
    with _lock:
        if _thread is not None or all(m in sys.modules for m in MODULES):
            return False
        _thread = threading.Thread(target=_import, name="convlens-preload", daemon=True)
        _thread.start()
        return True


def wait() -> None:
    """Block until the import started by :func:`start` (if any) has finished."""
    t = _thread
    if t is not None:
        t.join()
