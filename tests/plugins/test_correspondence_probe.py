"""The correspondence probe end to end: CLI, files, and every number recomputed from the files
with plain forward hooks."""

from __future__ import annotations

import json
import types
import warnings
from pathlib import Path

import convlens_correspondence
import numpy as np
import pytest
import torch
from convlens_correspondence import write_face_parts
from typer.testing import CliRunner

import convlens
from convlens.models import create_model

runner = CliRunner()


def _zf64():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_model("zfnet_mini", input_size=64)


@pytest.fixture(scope="module")
def zf64():
    torch.manual_seed(0)
    return _zf64()


@pytest.fixture
def app(isolated_host):
    """The CLI with the correspondence plugin and a 64-pixel zfnet registered as ``zf64``."""
    from convlens.cli import build_app

    models = types.SimpleNamespace()

    @convlens.hookimpl
    def convlens_register_models(registry):
        registry.register("zf64", _zf64)

    models.convlens_register_models = convlens_register_models
    isolated_host(("correspondence", convlens_correspondence), ("models", models))
    return build_app()


@pytest.fixture
def faces(tmp_path) -> Path:
    return write_face_parts(tmp_path / "faces")


def _one_error(result) -> str:
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_cli_embedded_default_writes_table_json_npz_and_figure(app, tmp_path):
    out = tmp_path / "out"
    res = runner.invoke(
        app, ["probe", "correspondence", "--model", "zf64", "--random", "3", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    for word in ("occlusion location", "right eye", "left eye", "nose", "random", "conv5 | fc7"):
        assert word in res.output
    assert "parts: std over 10 image pairs; random: std over 3 draws" in res.output
    d = out / "correspondence"
    doc = json.loads((d / "correspondence.json").read_text())
    assert doc["schema_version"] == 1
    assert doc["dataset"] == "embedded LFW faces" and doc["parts_file"] is None
    assert doc["layers"] == ["conv5", "fc7"] and doc["seed"] == 0 and doc["random_draws"] == 3
    assert [r["name"] for r in doc["rows"]] == ["right_eye", "left_eye", "nose", "random"]
    assert [r["std_over"] for r in doc["rows"]] == ["pairs", "pairs", "pairs", "draws"]
    assert len(doc["rows"][-1]["draws"]) == 3
    # the grey fill in model space: (0.5 - mean) / std with zfnet's ImageNet statistics
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    want = [(0.5 - m) / s for m, s in zip(mean, std, strict=True)]
    assert doc["fill"]["rgb01"] == 0.5
    np.testing.assert_allclose(doc["fill"]["model_space"], want, rtol=1e-6)
    assert "fraction" in doc["normalisation"]
    for img in doc["images"]:
        assert img["size"] == [25, 25] and set(img["parts"]) == {"right_eye", "left_eye", "nose"}
        for part in img["parts"].values():
            x0, y0, x1, y1 = part["input_box"]
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
    for name, cells in doc["table"].items():
        for layer in ("conv5", "fc7"):
            assert 0.0 <= cells[layer]["mean"] <= 1.0, name
    with np.load(d / "correspondence.npz") as npz:
        assert npz["inputs"].shape == (5, 3, 64, 64) and npz["inputs"].dtype == np.float32
    assert (d / "correspondence.png").stat().st_size > 1000
    section = json.loads((d / "section.json").read_text())
    assert section["figures"] == ["correspondence/correspondence.png"]
    assert "correspondence/correspondence.png" in (out / "index.html").read_text()
    run = json.loads((d / "run.json").read_text())
    assert run["options"]["random"] == 3 and run["seed"] == 0


def _plain_features(model, x, layers):
    """Activations through plain ``register_forward_hook``, flattened per image."""
    modules = dict(model.named_modules())
    got: dict[str, torch.Tensor] = {}
    handles = []
    for layer in layers:
        name = model.convlens_aliases.get(layer, layer)

        def hook(_m, _i, out, layer=layer):
            got[layer] = out.detach().clone().reshape(out.shape[0], -1)

        handles.append(modules[name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return got


def _naive_delta(eps: np.ndarray) -> float:
    s = np.sign(eps)
    n, d = s.shape
    diff = [np.count_nonzero(s[i] != s[j]) for i in range(n) for j in range(n) if i != j]
    return sum(diff) / (n * (n - 1) * d)


def test_every_delta_recomputed_from_the_files_with_plain_hooks(zf64, faces, tmp_path):
    out = tmp_path / "out"
    convlens.run_probe(
        "correspondence",
        zf64,
        images=[faces.parent],
        parts=faces,
        out=out,
        layers="conv2,fc7",
        random=2,
        jitter=0.25,
        seed=3,
        overview=False,
    )
    d = out / "correspondence"
    doc = json.loads((d / "correspondence.json").read_text())
    with np.load(d / "correspondence.npz") as npz:
        x = torch.from_numpy(npz["inputs"])
    fill = torch.tensor(doc["fill"]["model_space"], dtype=torch.float32).view(3, 1, 1)
    layers = doc["layers"]
    assert layers == ["conv2", "fc7"] and doc["jitter"] == 0.25
    base = _plain_features(zf64, x, layers)
    checked = 0
    for row in doc["rows"]:
        assert len(row["draws"]) == 2  # jitter: the parts are drawn --random times too
        for k, boxes in enumerate(row["draws"]):
            masked = x.clone()
            for i, b in enumerate(boxes):
                if b is not None:
                    masked[i, :, b[1] : b[3], b[0] : b[2]] = fill
            feats = _plain_features(zf64, masked, layers)
            for layer in layers:
                eps = (base[layer] - feats[layer])[row["images"]].numpy()
                want = _naive_delta(eps)
                got = row["layers"][layer]["values"][k]
                assert got == pytest.approx(want, abs=1e-12), (row["name"], layer, k)
                checked += 1
        for layer in layers:
            vals = row["layers"][layer]["values"]
            assert row["layers"][layer]["mean"] == pytest.approx(np.mean(vals))
            assert row["layers"][layer]["std"] == pytest.approx(np.std(vals))
    assert checked == 4 * 2 * 2
    # the jittered part boxes keep their size and stay within a quarter box of the annotation
    first = doc["images"][0]["parts"]["nose"]["input_box"]
    for boxes in doc["rows"][2]["draws"]:
        b = boxes[0]
        assert b[2] - b[0] == first[2] - first[0] and b[3] - b[1] == first[3] - first[1]
        assert abs(b[0] - first[0]) <= round(0.25 * (first[2] - first[0]))


def test_parts_file_gives_the_same_table_as_the_embedded_default(zf64, faces, tmp_path):
    a = convlens.run_probe("correspondence", zf64, out=tmp_path / "a", random=2, overview=False)
    b = convlens.run_probe(
        "correspondence",
        zf64,
        images=[faces.parent],
        parts=faces,
        out=tmp_path / "b",
        random=2,
        overview=False,
    )
    assert a.summary["dataset"] == "embedded LFW faces" and b.summary["dataset"] == "parts file"
    assert a.summary["table"] == b.summary["table"]
    # --parts alone: the images are the JSON's keys, relative to its folder
    c = convlens.run_probe(
        "correspondence", zf64, parts=faces, out=tmp_path / "c", random=2, overview=False
    )
    assert c.summary["table"] == a.summary["table"]


def test_cli_errors_are_one_line(app, tmp_path, images, faces):
    res = runner.invoke(
        app,
        [
            "probe",
            "correspondence",
            "--model",
            "zf64",
            "--images",
            str(images),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert res.exit_code == 2
    assert "--parts" in _one_error(res)

    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps({"img0.png": {"eye": [5, 5, 2, 9]}, "img1.png": {"eye": [1, 1, 4, 4]}})
    )
    res = runner.invoke(
        app,
        [
            "probe",
            "correspondence",
            "--model",
            "zf64",
            "--images",
            str(images),
            "--parts",
            str(bad),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert res.exit_code == 2
    assert "x0 < x1" in _one_error(res)

    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"img0.png": {"eye": [1, 1, 4, 4]}}))
    res = runner.invoke(
        app,
        [
            "probe",
            "correspondence",
            "--model",
            "zf64",
            "--images",
            str(images),
            "--parts",
            str(partial),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert res.exit_code == 2
    assert "img1.png: no entry" in _one_error(res)

    res = runner.invoke(
        app,
        [
            "probe",
            "correspondence",
            "--model",
            "zf64",
            "--layers",
            "conv9",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert res.exit_code == 2
    assert "conv9" in _one_error(res)


def test_unused_parts_entries_warn(zf64, faces, tmp_path):
    data = json.loads(faces.read_text())
    data["not_there.png"] = {"nose": [1, 1, 3, 3]}
    extra = tmp_path / "extra.json"  # outside the image folder: matched by name
    extra.write_text(json.dumps(data))
    faces.unlink()  # the folder then holds only images
    with pytest.warns(UserWarning, match="not_there.png"):
        convlens.run_probe(
            "correspondence",
            zf64,
            images=[faces.parent],
            parts=extra,
            out=tmp_path / "o",
            random=0,
            overview=False,
        )
