"""The ``occlusion`` probe end to end: the bundled coffee photo (the probability of
"espresso" drops where the square covers the cup, Zeiler & Fergus 2014, Section 4.2 / Fig. 7),
its files (every number recomputable from them alone), and its defaults."""

from __future__ import annotations

import json

import convlens_occlusion
import numpy as np
import pytest
import torch
from convlens_occlusion import POSITION_BUDGET, OcclusionProbe, auto_stride, parse_fill

from convlens import record, run_probe
from convlens.errors import ConvlensError
from convlens.plugins import PluginHost
from convlens.testing import tiny_probe_model

ESPRESSO = 967
# The cup (rim and coffee) in the 224x224 centre crop of skimage's coffee.png, annotated by eye:
# x 28..180, y 0..115 (input pixels).
CUP = (28, 0, 180, 115)


def test_espresso_drops_where_the_square_covers_the_cup(tmp_path):
    """The issue's acceptance check, at a coarse stride (49 squares of 56 px) to stay fast."""
    from convlens.data import sample

    out = tmp_path / "out"
    host = PluginHost(entry_points=False, extra=[("occlusion", convlens_occlusion)])
    result = run_probe("occlusion", "efficientnet_lite0", images=[sample("coffee").path],
                       out=out, host=host, overview=False, window=56, stride=28)  # fmt: skip
    assert result.summary["path"].startswith("incremental inference")
    meta = json.loads((out / "occlusion" / "occlusion.json").read_text())
    arrays = np.load(out / "occlusion" / "occlusion.npz")
    assert meta["schema_version"] == 1
    img = meta["per_image"][0]
    assert img["target"] == ESPRESSO and img["target_name"].startswith("espresso")
    assert meta["class_names"][str(ESPRESSO)].startswith("espresso")
    prob = arrays["prob_target"][0].reshape(-1)
    boxes = np.asarray(meta["grid"]["boxes"])
    assert prob.shape == (len(boxes),) == (49,)
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    x0, y0, x1, y1 = CUP
    on_cup = (cx >= x0) & (cx <= x1) & (cy >= y0) & (cy <= y1)
    off_cup = (boxes[:, 2] <= x0) | (boxes[:, 0] >= x1) | (boxes[:, 1] >= y1)  # no overlap
    assert on_cup[prob.argmin()], f"largest drop at {boxes[prob.argmin()]}, not on the cup"
    p0 = img["prob_orig"]
    assert p0 > 0.5
    assert p0 - prob[on_cup].min() > 3 * (p0 - prob[off_cup].min())
    section = json.loads((out / "occlusion" / "section.json").read_text())
    assert "Panel (c) omitted" in section["html"] and "not installed" in section["html"]
    for fig in section["figures"]:
        assert (out / fig).is_file()
    assert (out / "index.html").is_file()
    # the time of every phase, the figures' included (added after rendering)
    phases = json.loads((out / "occlusion" / "occlusion.json").read_text())["phases"]
    for k in ("default_layer", "trace", "validate", "unoccluded", "sweep", "write", "figures"):
        assert phases[k] >= 0.0, k
    assert 0.0 < phases["sweep"] < phases["total"]
    assert phases["total"] == pytest.approx(meta["seconds"], abs=0.05)


@pytest.fixture
def tiny_with_info():
    return tiny_probe_model("chain")


def test_every_number_is_recomputable_from_the_files(tmp_path, images, tiny_with_info):
    model = tiny_with_info
    host = PluginHost(entry_points=False, extra=[("occlusion", convlens_occlusion)])
    result = run_probe("occlusion", model, images=[images], out=tmp_path, host=host,
                       window=9, stride=5, fill="0.2,0.4,0.6", method="auto")  # fmt: skip
    meta = json.loads((tmp_path / "occlusion" / "occlusion.json").read_text())
    z = np.load(tmp_path / "occlusion" / "occlusion.npz")
    n, rows, cols = z["prob_target"].shape
    assert n == 3 and z["inputs"].shape == (3, 3, 32, 32)
    assert z["feature_activity"].shape == z["top_class"].shape == (n, rows, cols)
    assert (rows, cols) == (meta["grid"]["rows"], meta["grid"]["cols"]) == (6, 6)
    assert np.array_equal(np.asarray(meta["grid"]["boxes"]), z["boxes"])
    assert meta["path"]["method"] == "incremental"
    assert result.summary["path"].startswith("incremental inference")
    fill = np.asarray(meta["fill"]["model_space"], dtype=np.float32)
    rgb, mean, std = np.array([0.2, 0.4, 0.6]), np.array([0.485, 0.456, 0.406]), np.array(
        [0.229, 0.224, 0.225])  # fmt: skip
    assert np.allclose(fill, (rgb - mean) / std, atol=1e-6)
    layer = meta["layer_module"]
    for i in range(n):
        channel = meta["per_image"][i]["channel"]
        target = meta["per_image"][i]["target"]
        for p in (0, 7, rows * cols - 1):  # first, inner, last (clipped) square
            x0, y0, x1, y1 = z["boxes"][p]
            x = torch.from_numpy(z["inputs"][i : i + 1]).clone()
            x[:, :, y0:y1, x0:x1] = torch.from_numpy(fill).view(3, 1, 1)
            with torch.no_grad(), record(model, [layer], switches=False, trace=False) as rec:
                logits = model(x)[0].double()
            r, c = divmod(p, cols)
            assert abs(logits.softmax(0)[target] - z["prob_target"][i, r, c]) <= 1e-6
            assert int(logits.argmax()) == z["top_class"][i, r, c]
            feat = float(rec[layer][0, channel].double().sum())
            assert abs(feat - z["feature_activity"][i, r, c]) <= 1e-5 * max(1.0, abs(feat))


def test_default_stride_keeps_the_demo_within_budget():
    assert auto_stride(1, 224, 224, 32) == 8  # Fig. 7's sweep for one or two images
    assert auto_stride(2, 224, 224, 32) == 8
    assert auto_stride(6, 224, 224, 32) == 16  # the demo's six photos
    assert 6 * (224 - 32 + 16) ** 2 // 16**2 <= POSITION_BUDGET
    assert auto_stride(100, 224, 224, 32) == 32
    assert auto_stride(100, 224, 224, 20) == 20  # never a gap between squares
    assert auto_stride(1, 112, 112, 16) == 4  # scaled with the input


def test_fill_option():
    mean = (0.1, 0.2, 0.3)
    assert parse_fill("mean", mean) == (mean, "dataset mean pixel")
    assert parse_fill("grey", mean)[0] == (0.5, 0.5, 0.5)
    assert parse_fill("0.25", mean)[0] == (0.25, 0.25, 0.25)
    assert parse_fill("0,0.5,1", mean)[0] == (0.0, 0.5, 1.0)
    for bad in ("blue", "1.5", "0.1,0.2"):
        with pytest.raises(ConvlensError, match="--fill"):
            parse_fill(bad, mean)


def test_probe_is_registered_with_its_options():
    host = PluginHost()
    assert host.probes.get("occlusion") is OcclusionProbe
    flags = {o.flag for o in OcclusionProbe.options}
    assert {"--window", "--stride", "--fill", "--target", "--layer", "--method"} <= flags


def test_panel_c_comes_from_the_deconv_plugin_when_installed(
    tmp_path, images, tiny_with_info, monkeypatch
):
    import sys
    import types

    import convlens

    calls = []

    def project_strongest(model, inputs, layer, channel):
        calls.append((layer, channel, inputs.shape[0]))
        return torch.full((inputs.shape[0], 3, *inputs.shape[-2:]), float(channel))

    stub = types.ModuleType("convlens_deconv")
    stub.project_strongest = project_strongest  # the contract: no other names needed
    monkeypatch.setitem(sys.modules, "convlens_deconv", stub)

    class StubDeconv(convlens.Probe):
        name = "deconv"

    host = PluginHost(entry_points=False, extra=[("occlusion", convlens_occlusion)])
    host.probes.register("deconv", StubDeconv)
    run_probe("occlusion", tiny_with_info, images=[images], out=tmp_path, host=host,
              overview=False, window=16, stride=16)  # fmt: skip
    meta = json.loads((tmp_path / "occlusion" / "occlusion.json").read_text())
    expected = [(meta["layer"], img["channel"], 1) for img in meta["per_image"]]
    assert calls == expected  # one projection per image, of the map used in (b)
    section = json.loads((tmp_path / "occlusion" / "section.json").read_text())
    assert "projected to pixels by the deconv probe" in section["html"]
    assert "omitted" not in section["html"]


def test_occlusion_keeps_working_on_a_vit_token_model(tmp_path, images):
    import warnings

    torch.set_num_threads(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = run_probe("occlusion", "vit_tiny_patch16_224", images=[sorted(images.iterdir())[0]],
                        out=tmp_path, overview=False, window=112, stride=112)  # fmt: skip
    meta = json.loads((tmp_path / "occlusion" / "occlusion.json").read_text())
    z = np.load(tmp_path / "occlusion" / "occlusion.npz")
    assert z["prob_target"].shape[0] == 1 and np.isfinite(z["prob_target"]).all()
    assert meta["per_image"] and res.files
