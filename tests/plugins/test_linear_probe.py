"""The ``linear`` probe end to end: registration through the entry point, the CLI on an
ImageFolder (table in the terminal, linear.json, the plot, the report section, the cache on a
second run), the embedded sets, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import convlens_linear
import numpy as np
import pytest
from convlens_linear import EMBEDDED, LinearProbe, embedded_dataset, scan_image_folder
from PIL import Image

from convlens import run_probe
from convlens.errors import ConvlensError
from convlens.models import ModelInfo
from convlens.plugins import PluginHost
from convlens.testing import tiny_model
from tests.conftest import run_cli

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def tiny():
    model, _ = tiny_model("chain")
    model.convlens_info = ModelInfo(
        "tiny-chain", "test", "seed0", False, 5, (3, 32, 32), MEAN, STD, "bilinear", 1.0
    )
    return model


def make_folder(root: Path, classes: int = 3, per_class: int = 5) -> Path:
    rng = np.random.default_rng(2)
    for c in range(classes):
        (root / f"k{c}").mkdir(parents=True)
        for i in range(per_class):
            rgb = np.full((48, 48, 3), 60.0 + 60 * c) + rng.normal(0, 25, (48, 48, 3))
            Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(root / f"k{c}/{i}.png")
    return root


def host():
    return PluginHost(entry_points=False, extra=[("linear", convlens_linear)])


def test_registered_through_the_entry_point():
    probes = PluginHost().probes
    assert probes.get("linear") is LinearProbe
    assert LinearProbe.needs_images is False
    flags = {o.flag for o in LinearProbe.options}
    assert {
        "--data",
        "--layers",
        "--classifier",
        "--train-per-class",
        "--test-per-class",
        "--folds",
        "--pool",
        "--cache",
    } <= flags
    assert "--seed" not in flags and "--out" not in flags  # common options, from the CLI


@pytest.mark.filterwarnings("ignore:model 'zfnet_mini' has RANDOM weights")
def test_cli_on_an_image_folder_then_from_the_cache(tmp_path):
    data = make_folder(tmp_path / "data")
    out = tmp_path / "out"
    args = [
        "probe",
        "linear",
        "--model",
        "zfnet_mini",
        "--data",
        str(data),
        "--layers",
        "conv1,fc7",
        "--classifier",
        "svm",
        "--train-per-class",
        "1,2",
        "--test-per-class",
        "3",
        "--folds",
        "2",
        "--seed",
        "5",
        "--out",
        str(out),
    ]
    res = run_cli(args)
    assert res.returncode == 0, res.stderr
    assert "svm (conv1, " in res.stdout and "svm (fc7, " in res.stdout
    assert "1/class  2/class" in res.stdout and "extracted" in res.stdout
    meta = json.loads((out / "linear" / "linear.json").read_text())
    assert meta["schema_version"] == 1 and meta["seed"] == 5
    assert meta["protocol"]["train_per_class"] == [1, 2] and meta["protocol"]["folds"] == 2
    assert meta["dataset"]["classes"] == ["k0", "k1", "k2"] and meta["dataset"]["embedded"] is None
    conv1 = meta["layers"][0]
    assert conv1["pool"] == "avg" and conv1["dim"] <= 9216  # a big map is pooled by default
    assert [(r["layer"], r["classifier"], r["k"]) for r in meta["results"]] == [
        ("conv1", "svm", 1),
        ("conv1", "svm", 2),
        ("fc7", "svm", 1),
        ("fc7", "svm", 2),
    ]
    # K = 1: no cross-validation possible, the grid's median is used and recorded as such
    assert all(f["cv_scores_pct"] is None and f["C"] == 1e-3 for f in meta["results"][0]["folds"])
    assert all(len(f["cv_scores_pct"]) == 6 for f in meta["results"][1]["folds"])
    assert len(meta["splits"]) == 4 and (out / "linear" / "linear.png").stat().st_size > 10_000
    report = (out / "index.html").read_text()
    assert "Linear probes per layer" in report and "linear/linear.png" in report
    # the same run again (in-process, same model and options) reads the features back
    again = run_probe(
        "linear",
        "zfnet_mini",
        out=out,
        host=host(),
        data=data,
        seed=5,
        layers="conv1,fc7",
        classifier="svm",
        train_per_class="1,2",
        test_per_class=3,
        folds=2,
        overview=False,
    )
    assert again.data["timing"]["from_cache"] and again.data["timing"]["shards_computed"] == []
    assert "read from cache" in dict(LinearProbe().describe(again))["features"]
    assert again.data["results"] == meta["results"]


def test_embedded_digits_run(tmp_path):
    out = tmp_path / "out"
    result = run_probe(
        "linear",
        tiny(),
        out=out,
        host=host(),
        overview=False,
        embedded="digits",
        layers="conv2,conv3",
        classifier="softmax",
        train_per_class="3",
        test_per_class=4,
        folds=2,
        c_grid="1e-3,1",
    )
    meta = result.data
    assert meta["dataset"]["embedded"] == "digits" and meta["dataset"]["n_images"] == 160
    assert meta["dataset"]["classes"] == [str(d) for d in range(10)]
    folder = Path(meta["dataset"]["root"])
    assert folder.is_relative_to(out / ".cache" / "linear")  # never inside the package
    rows = dict(LinearProbe().describe(result))
    assert rows["table"] == "3/class"
    assert set(rows) >= {"softmax (conv2, 588-d)", "softmax (conv3, 144-d)", "dataset"}
    for r in meta["results"]:
        assert 0.0 <= r["mean_pct"] <= 100.0 and len(r["folds"]) == 2
    section = json.loads((out / "linear" / "section.json").read_text())
    assert section["figures"] == ["linear/linear.png"] and "<table>" in section["html"]
    run = json.loads((out / "linear" / "run.json").read_text())
    assert run["summary"]["images"] == 160


def test_embedded_photo_views_written_once(tmp_path):
    folder = embedded_dataset("photo-views", tmp_path)
    ds = scan_image_folder(folder)
    assert len(ds.classes) == 10 and ds.counts().tolist() == [EMBEDDED["photo-views"][1]] * 10
    assert "coffee" in ds.classes and max(Image.open(ds.paths[0]).size) <= 256
    stamp = ds.paths[0].stat().st_mtime_ns
    assert embedded_dataset("photo-views", tmp_path) == folder
    assert ds.paths[0].stat().st_mtime_ns == stamp
    with pytest.raises(ConvlensError, match="unknown"):
        embedded_dataset("cifar", tmp_path)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"classifier": "softmax,knn"}, "--classifier 'knn'"),
        ({"cv_folds": 1}, "--cv-folds: 1 is below its minimum 2"),
        ({"c_grid": "1e-3,-1"}, "--c-grid"),
        ({"train_per_class": "5"}, "class 'k0' has 5 readable image"),
        ({"layers": "conv9"}, "conv9"),
    ],
)
def test_errors_name_the_option_at_fault(tmp_path, options, message):
    data = make_folder(tmp_path / "data")
    with pytest.raises(ConvlensError, match=message):
        run_probe(
            "linear",
            tiny(),
            out=tmp_path / "out",
            host=host(),
            overview=False,
            data=data,
            **{"train_per_class": "2", "folds": 1, **options},
        )


def test_images_option_is_rejected_not_ignored(tmp_path):
    """linear reads labelled sets (--data); --images would be silently dropped otherwise."""
    res = run_cli(["probe", "linear", "--images", str(tmp_path), "--out", str(tmp_path / "o")])
    assert res.returncode == 2
    assert "--images" in res.stderr
    assert not (tmp_path / "o").exists()
    helped = run_cli(["probe", "linear", "--help"])
    assert "--data" in helped.stdout and "--images" not in helped.stdout
