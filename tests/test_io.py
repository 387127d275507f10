"""Atomic writes: the temporary file is renamed into place with the mode a plain open() gives."""

from __future__ import annotations

import os

import numpy as np
import pytest

from convlens.io import save_npz, write_json, write_text
from convlens.render import save_png


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_get_the_mode_open_would_give(tmp_path, umask):
    old = os.umask(umask)
    try:
        with open(tmp_path / "plain", "w") as fh:
            fh.write("x")
        want = os.stat(tmp_path / "plain").st_mode & 0o777
        files = [
            write_json(tmp_path / "a.json", {"k": 1}),
            write_text(tmp_path / "b.html", "<p>"),
            save_npz(tmp_path / "c.npz", a=np.zeros(2)),
            save_png(np.zeros((4, 4, 3)), tmp_path / "d.png"),
        ]
    finally:
        os.umask(old)
    assert want == 0o666 & ~umask
    for f in files:
        assert os.stat(f).st_mode & 0o777 == want, f
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
