"""Shared fixtures: real dist-info plugins on sys.path, small images, an isolated plugin host."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def make_dist(
    root: Path,
    dist: str,
    modules: dict[str, str],
    entry_points: dict[str, str],
    version: str = "0.1.0",
) -> Path:
    """Install a distribution the way pip lays it out: modules + ``*.dist-info`` with
    ``entry_points.txt``, so ``importlib.metadata`` discovers it when ``root`` is on sys.path."""
    root.mkdir(parents=True, exist_ok=True)
    for name, source in modules.items():
        (root / f"{name}.py").write_text(source)
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    eps = "[convlens]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(eps)
    (info / "RECORD").write_text("")
    return root


def run_cli(
    args: list[str], pythonpath: Path | None = None, env: dict | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    """``python -m convlens ARGS`` in a subprocess (fresh entry-point discovery)."""
    e = dict(os.environ)
    e["CONVLENS_NO_PROGRESS"] = "1"
    if pythonpath is not None:
        e["PYTHONPATH"] = str(pythonpath) + os.pathsep + e.get("PYTHONPATH", "")
    e.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "convlens", *args],
        capture_output=True,
        text=True,
        env=e,
        timeout=timeout,
        cwd=str(pythonpath or REPO),
    )


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """A folder with three small RGB photos-like images (seeded noise + gradients)."""
    d = tmp_path / "imgs"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        yy, xx = np.mgrid[0:96, 0:128]
        base = np.stack([xx / 128, yy / 96, (xx + yy) / 224], -1) * 200
        arr = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(d / f"img{i}.png")
    return d


@pytest.fixture
def isolated_host(monkeypatch):
    """Replace the process's plugin host by one built from the given plugin objects."""
    import convlens.plugins as plugins

    def make(*extra, entry_points: bool = False):
        host = plugins.PluginHost(entry_points=entry_points, extra=list(extra))
        monkeypatch.setattr(plugins, "_DEFAULT", host)
        return host

    yield make


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """The embedded mining set (and any other cache) goes to a folder of this test session, not
    the user's ~/.cache (subprocesses inherit the variable)."""
    old = os.environ.get("CONVLENS_CACHE")
    os.environ["CONVLENS_CACHE"] = str(tmp_path_factory.mktemp("convlens-cache"))
    yield
    if old is None:
        os.environ.pop("CONVLENS_CACHE", None)
    else:
        os.environ["CONVLENS_CACHE"] = old
