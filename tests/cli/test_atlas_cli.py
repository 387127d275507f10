"""``convlens atlas`` from the command line: bad input exits 2 with one line naming the culprit and
leaves what was already in --out untouched; a small run writes the site and links it from the
report."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from convlens.cli import build_app

runner = CliRunner()
ATLAS = ["atlas", "--model", "zfnet_mini"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("atlas-cli")
    good = d / "good"
    good.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(good / f"{i}.png")
    (d / "empty").mkdir()
    (d / "junk").mkdir()
    (d / "junk" / "a.jpg").write_bytes(b"not a jpeg")
    (d / "corrupt.tar").write_bytes(b"\x07garbage" * 300)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        data = (good / "0.png").read_bytes()
        info = tarfile.TarInfo("k0.png")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    (d / "cut.tar").write_bytes(buf.getvalue()[:700])  # a header cut in half
    return d


ROWS = [
    ("missing folder", ["--images", "{d}/nope"], "nope"),
    ("empty dataset", ["--images", "{d}/empty"], "empty"),
    ("corrupt tar", ["--images", "{d}/corrupt.tar"], "corrupt.tar"),
    ("truncated tar", ["--images", "{d}/cut.tar"], "cut.tar"),
    ("bad --units", ["--images", "{d}/good", "--units", "a-b"], "--units"),
    ("negative unit", ["--images", "{d}/good", "--units", "-3"], "--units"),
    (
        "units beyond every layer",
        ["--images", "{d}/good", "--layers", "conv1", "--units", "900-999"],
        "conv1",
    ),  # fmt: skip
    ("unknown layer", ["--images", "{d}/good", "--layers", "conv1,conv99"], "conv99"),
    ("unknown rule", ["--images", "{d}/good", "--rule", "magic"], "--rule"),
    ("no readable image", ["--images", "{d}/junk"], "junk"),
]


@pytest.mark.parametrize("label,args,culprit", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_exits_2_in_one_line_and_keeps_the_previous_atlas(data, tmp_path, label, args,
                                                                      culprit):  # fmt: skip
    out = tmp_path / "out"
    (out / "atlas").mkdir(parents=True)
    (out / "atlas" / "index.html").write_text("the previous atlas")
    args = [*ATLAS, *(a.format(d=data) for a in args), "--out", str(out)]
    res = runner.invoke(build_app(), args)
    lines = [ln for ln in res.output.splitlines() if ln.strip() and "warning:" not in ln
             and "RANDOM" not in ln and "note:" not in ln]  # fmt: skip
    assert res.exit_code == 2, (label, res.output)
    assert len(lines) == 1 and culprit in lines[0], (label, res.output)
    assert "Traceback" not in res.output
    assert (out / "atlas" / "index.html").read_text() == "the previous atlas", label
    assert sorted(p.name for p in out.iterdir() if p.name != ".convlens.lock") == ["atlas"], label


def test_a_small_atlas_from_the_command_line(data, tmp_path):
    out = tmp_path / "out"
    args = [*ATLAS, "--images", str(data / "good"), "--layers", "conv1,conv2", "--units", "0-1",
            "--top", "3", "--out", str(out)]  # fmt: skip
    res = runner.invoke(build_app(), args)
    assert res.exit_code == 0, res.output
    assert "atlas/index.html" in res.output
    site = out / "atlas"
    assert (site / "index.html").is_file() and (site / "atlas.json").is_file()
    assert len(list(site.glob("*/u*.html"))) == 4
    assert "href='atlas/index.html'" in (out / "index.html").read_text()
