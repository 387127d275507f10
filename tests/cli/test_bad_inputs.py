"""The regression table of bad inputs and options: each row exits 2 with exactly one error line
naming the culprit, no traceback, and leaves no file in --out."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from convlens.cli import build_app
from tests.data.test_data_images import _write_png

runner = CliRunner()


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def _photo(path: Path, size=(64, 48)) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    good = _photo(d / "good.png")
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(buf, format="JPEG")
    (d / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (d / "text.png").write_text("this is not an image\n")
    _write_png(d / "bomb.png", 100_000, 100_000, 8, 2, b"\x13\x37" * 64)
    (d / "empty").mkdir()
    with open(d / "evil.pt", "wb") as fh:
        pickle.dump({"state_dict": _Evil()}, fh)
    torch.save({"x": torch.zeros(1)}, d / "wrong.pt")
    return {"dir": d, "good": good}


def _rows():
    occ = ["probe", "occlusion", "--model", "zfnet_mini"]
    dec = ["probe", "deconv", "--model", "zfnet_mini", "--no-poster"]
    return [
        ("truncated jpeg", [*occ, "--images", "{dir}/truncated.jpg"], "truncated.jpg"),
        ("text as png", [*occ, "--images", "{dir}/text.png"], "text.png"),
        ("decompression bomb", [*occ, "--images", "{dir}/bomb.png"], "bomb.png"),
        ("empty folder", [*occ, "--images", "{dir}/empty"], "empty"),
        ("missing path", [*occ, "--images", "{dir}/nope.png"], "nope.png"),
        ("unknown layer", [*dec, "--images", "{good}", "--layer", "conv9"], "conv9"),
        (
            "channel out of range",
            [*dec, "--images", "{good}", "--layer", "conv5", "--channels", "9999"],
            "9999",
        ),  # fmt: skip
        ("top 0", [*dec, "--images", "{good}", "--top", "0"], "--top"),
        ("negative stride", [*occ, "--images", "{good}", "--stride", "-4"], "--stride"),
        ("zero window", [*occ, "--images", "{good}", "--window", "0"], "--window"),
        (
            "window larger than the image",
            [*occ, "--images", "{good}", "--window", "999"],
            "window",
        ),  # fmt: skip
        ("target >= classes", [*occ, "--images", "{good}", "--target", "5000"], "5000"),
        ("unknown option", [*occ, "--images", "{good}", "--strid", "8"], "--strid"),
        (
            "pickled code in weights",
            [*occ, "--images", "{good}", "--weights", "{dir}/evil.pt"],
            "evil.pt",
        ),  # fmt: skip
        (
            "unknown model",
            ["probe", "occlusion", "--model", "zfnt", "--images", "{good}"],
            "zfnt",
        ),  # fmt: skip
        ("out is a file", [*occ, "--images", "{good}", "--out", "{good}"], "good.png"),
        (
            "token layer of a ViT",
            [
                "probe",
                "deconv",
                "--model",
                "vit_tiny_patch16_224",
                "--images",
                "{good}",
                "--layer",
                "blocks.0",
            ],
            "blocks.0",
        ),  # fmt: skip
    ]


ROWS = _rows()


@pytest.mark.parametrize("label,args,culprit", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_exits_2_in_one_line_and_writes_nothing(inputs, tmp_path, label, args, culprit):
    args = [a.format(dir=inputs["dir"], good=inputs["good"]) for a in args]
    out = tmp_path / "out"
    if "--out" not in args:
        args += ["--out", str(out)]
    res = runner.invoke(build_app(), args)
    lines = [ln for ln in res.output.splitlines() if ln.strip() and "warning:" not in ln
             and "RANDOM" not in ln]  # fmt: skip
    assert res.exit_code == 2, (label, res.output)
    assert len(lines) == 1, (label, res.output)
    assert culprit in lines[0], (label, lines[0])
    assert "Traceback" not in res.output
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()], label
