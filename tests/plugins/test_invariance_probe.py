"""The invariance probe end to end (CLI, files) and the paper's translation finding on the
pretrained default model."""

from __future__ import annotations

import json
import types
import warnings

import convlens_invariance
import numpy as np
import pytest
from typer.testing import CliRunner

import convlens
from convlens.models import create_model

runner = CliRunner()


def _zf64():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_model("zfnet_mini", input_size=64)


@pytest.fixture
def app(isolated_host):
    from convlens.cli import build_app

    models = types.SimpleNamespace()

    @convlens.hookimpl
    def convlens_register_models(registry):
        registry.register("zf64", _zf64)

    models.convlens_register_models = convlens_register_models
    isolated_host(("invariance", convlens_invariance), ("models", models))
    return build_app()


def _one_error(result) -> str:
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_cli_all_transforms_write_json_and_three_figures(app, images, tmp_path):
    out = tmp_path / "out"
    args = [
        "probe",
        "invariance",
        "--model",
        "zf64",
        "--images",
        str(images),
        "--steps",
        "4",
        "--labels",
        "3",
        "--out",
        str(out),
    ]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "translation" in res.output and "conv1" in res.output
    d = out / "invariance"
    doc = json.loads((d / "invariance.json").read_text())
    assert doc["schema_version"] == 1 and doc["layers"] == ["conv1", "fc7"]
    assert doc["transforms"]["translate"] == {
        "amounts": [-60.0, -20.0, 0.0, 20.0, 60.0],
        "unit": "px",
    }
    assert doc["transforms"]["scale"]["amounts"] == pytest.approx(
        [0.5, 0.8666667, 1.0, 1.2333333, 1.6]
    )
    assert doc["transforms"]["rotate"]["amounts"] == pytest.approx(
        [0.0, 116.666667, 233.333333, 350.0]
    )
    assert (
        doc["transforms"]["rotate"]["unit"] == "deg" and doc["transforms"]["scale"]["unit"] == "x"
    )
    assert doc["label_source"] == "given" and doc["canvas"] == "mean"
    assert [im["name"] for im in doc["images"]] == ["img0", "img1", "img2"]
    for im in doc["images"]:
        assert im["label"] == 3
        for kind, n in (("translate", 5), ("scale", 5), ("rotate", 4)):
            c = im["curves"][kind]
            assert len(c["prob"]) == n and set(c["distance"]) == {"conv1", "fc7"}
            zero = doc["transforms"][kind]["amounts"].index(0.0 if kind != "scale" else 1.0)
            assert c["distance"]["conv1"][zero] == 0.0 and c["distance"]["fc7"][zero] == 0.0
            assert c["prob"][zero] == pytest.approx(im["prob_untransformed"], rel=1e-6)
    assert set(doc["translation_growth"]) == {"conv1", "fc7"}
    assert "d(±20 px) / d(±60 px)" not in res.output  # not the default grid: named generically
    assert "d(smallest) / d(largest shift)" in res.output
    for kind in ("translate", "scale", "rotate"):
        assert (d / f"invariance_{kind}.png").stat().st_size > 5000
    section = json.loads((d / "section.json").read_text())
    assert section["figures"] == [
        f"invariance/invariance_{k}.png" for k in ("translate", "scale", "rotate")
    ]


def test_one_transform_and_error_lines(app, images, tmp_path):
    out = tmp_path / "o"
    res = runner.invoke(
        app,
        [
            "probe",
            "invariance",
            "--model",
            "zf64",
            "--images",
            str(images),
            "--transform",
            "rotate",
            "--steps",
            "3",
            "--layers",
            "conv2",
            "--canvas",
            "reflect",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "invariance" / "invariance.json").read_text())
    assert list(doc["transforms"]) == ["rotate"] and doc["layers"] == ["conv2"]
    assert doc["canvas"] == "reflect" and doc["translation_growth"] is None
    assert doc["label_source"].startswith("top-1")

    res = runner.invoke(
        app,
        [
            "probe",
            "invariance",
            "--model",
            "zf64",
            "--images",
            str(images),
            "--labels",
            "1,2",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 2 and "2 labels for 3 images" in _one_error(res)
    res = runner.invoke(
        app,
        [
            "probe",
            "invariance",
            "--model",
            "zf64",
            "--images",
            str(images),
            "--transform",
            "shear",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 2


def test_layer1_distance_grows_faster_with_translation_than_the_top_layer():
    """Fig. 5 (a): on the pretrained default, normalised by each layer's distance at +-60 px, the
    first layer's distance is already near its maximum at +-20 px, the top layer's is not."""
    from convlens.data import sample

    model = create_model("efficientnet_lite0")
    imgs = [convlens.data.load_image(sample(n).path) for n in ("coffee", "chelsea")]
    res = convlens_invariance.invariance(
        model, imgs, transforms=["translate"], amounts={"translate": [-60, -20, 0, 20, 60]}
    )
    assert res.layers == ["bn1.act", "global_pool.pool"]
    growth = convlens_invariance.translation_growth(res)
    assert growth["bn1.act"] > growth["global_pool.pool"] + 0.15, growth
    # per image, too
    first = res.normalised("translate", "bn1.act")[:, [1, 3]].mean(axis=1)
    top = res.normalised("translate", "global_pool.pool")[:, [1, 3]].mean(axis=1)
    assert np.all(first > top), (first, top)
