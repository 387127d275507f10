"""The deconv probe end to end: files and their schema, listed projections recomputed with
Captum, Fig. 4 evolution from checkpoints, Fig. 6 comparison and diagnostics, the CLI."""

from __future__ import annotations

import json
import types
from pathlib import Path

import convlens_deconv
import numpy as np
import pytest
import torch
from captum.attr import NeuronDeconvolution, NeuronGuidedBackprop
from convlens_deconv import band_energies, feature_evolution, filter_diagnostics

import convlens
from convlens.data import Preprocess, SkippedImageWarning, load_image
from convlens.engine import record
from convlens.errors import ConvlensError
from convlens.models import ModelInfo
from convlens.render.crops import cut
from convlens.testing import tiny_model
from tests.conftest import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed: int = 0, lrn: bool = False):
    model, _ = tiny_model("chain", seed=seed, lrn=lrn)
    model.convlens_info = ModelInfo("tiny", "tiny", "random", True, 5, input_size=(3, 32, 32))
    return model


def _models_plugin() -> types.ModuleType:
    mod = types.ModuleType("tiny_models_plugin")

    @convlens.hookimpl
    def convlens_register_models(registry):
        registry.register("tiny_b", lambda: tiny(seed=3))

    mod.convlens_register_models = convlens_register_models
    return mod


def test_probe_writes_documented_files_and_listed_projections_match_captum(tmp_path, images):
    model = tiny()
    (images / "broken.png").write_bytes(b"not an image")  # skipped with a warning, everywhere
    with pytest.warns(SkippedImageWarning, match="broken.png"):
        res = convlens.run_probe(
            "deconv",
            model,
            images=[images],
            out=tmp_path,
            overview=False,
            device="cpu",
            channels="2,5,7",
            top=2,
            poster_images=2,
            neuron=["2,3,2,1"],
        )
    out = tmp_path / "deconv"
    doc = json.loads((out / "deconv.json").read_text())
    npz = np.load(out / "deconv.npz")
    assert doc["schema_version"] == 2 and doc["layer"] == "conv3"
    assert [ld["layer"] for ld in doc["layers"]] == ["conv1", "conv2", "conv3"]
    assert doc["rule_requested"] == "auto" and doc["rule"] in ("deconvnet", "guided")
    for ld in doc["layers"]:
        assert ld["rule"] == ld["rule_choice"]["rule"] and ld["rule_choice"]["reason"]
        assert ld["channels"] == [2, 5, 7] and ld["method"] == "chain"
    assert doc["channels"] == [2, 5, 7] and doc["k"] == 2 and doc["mining"]["images"] == 3
    kinds = [e["kind"] for e in doc["projections"]]
    assert kinds.count("topk") == 3 * 3 * 2 and kinds.count("neuron") == 1
    assert kinds.count("poster") == 2 * len(doc["poster"]["layers"])
    for li, ld in enumerate(doc["layers"]):
        h, w = ld["crop_size"]
        assert npz[f"layer{li}_projections"].shape == (6, 3, h, w)
        assert npz[f"layer{li}_projections"].dtype == np.float32
        assert npz[f"layer{li}_patches"].shape == (6, 3, h, w)
        assert npz[f"layer{li}_patches"].dtype == np.uint8
    posters = [e for e in doc["projections"] if e["kind"] == "poster"]
    for pi, lay in enumerate(doc["poster"]["layers"]):
        arr = npz[f"poster{pi}_projections"]
        mine = [e for e in posters if e["layer"] == lay]
        x0, y0, x1, y1 = mine[0]["receptive_field"]["crop"]
        assert arr.shape == (len(mine), 3, y1 - y0, x1 - x0)  # cut to the layer's crop
    figs = [f"fig2_{i}_{n}.png" for i, n in enumerate(("conv1", "conv2", "conv3"))]
    for name in (*figs, "poster_layers.png", "fig6_filters.png"):
        assert (out / name).stat().st_size > 0
    assert res.summary["projections"] == len(kinds)
    section = json.loads((out / "section.json").read_text())
    assert "deconv/fig2_2_conv3.png" in section["figures"]
    # recompute listed projections independently: Captum from the image files, times the value
    pre = Preprocess.for_model(model)
    rule = next(ld["rule"] for ld in doc["layers"] if ld["layer"] == "conv3")
    ref_cls = NeuronDeconvolution if rule == "deconvnet" else NeuronGuidedBackprop
    nd = ref_cls(model, model.features.relu3)
    checked = 0
    for e in doc["projections"]:
        if e["layer"] != "conv3" or e["kind"] == "poster":
            continue
        x = pre(load_image(e["image"]))[None]
        with torch.no_grad(), record(model, ["conv3"], switches=False, trace=False) as rec:
            model(x)
        a = float(rec["conv3"][0, e["channel"], e["y"], e["x"]])
        assert e["activation"] == pytest.approx(a, rel=1e-5, abs=1e-7)
        ref = nd.attribute(x, neuron_selector=(e["channel"], e["y"], e["x"]))[0] * max(a, 0.0)
        x0, y0, x1, y1 = e["receptive_field"]["crop"]
        got = npz[e["array"]][e["row"]]
        want = cut(ref.numpy(), (x0, y0, x1, y1), 0.0)
        assert got.shape == want.shape
        assert float(np.abs(got - want).max()) <= 1e-5 * max(float(ref.abs().max()), 1e-12)
        cx0, cy0, cx1, cy1 = e["receptive_field"]["clipped"]
        assert 0 <= cx0 < cx1 <= 32 and 0 <= cy0 < cy1 <= 32
        outside = ref.clone()
        outside[:, cy0:cy1, cx0:cx1] = 0
        assert float(outside.abs().max()) == 0.0  # nothing outside the receptive field
        if e["kind"] == "topk":
            patch = npz[e["array"].replace("projections", "patches")][e["row"]]
            img01 = pre.denormalize(x)[0].numpy()
            np.testing.assert_allclose(
                patch / 255.0, cut(img01, (x0, y0, x1, y1), 0.0), atol=0.5 / 255 + 1e-6
            )
        checked += 1
    assert checked == 7
    neuron = next(e for e in doc["projections"] if e["kind"] == "neuron")
    assert (neuron["channel"], neuron["y"], neuron["x"]) == (3, 2, 1)
    assert Path(neuron["image"]).name == "img1.png"  # files sorted: broken.png is index 0


def test_checkpoints_render_feature_evolution(tmp_path, images):
    model = tiny()
    paths = []
    for seed in (1, 2):
        p = tmp_path / f"epoch{seed}.pt"
        torch.save(tiny(seed=seed).state_dict(), p)
        paths.append(p)
    convlens.run_probe(
        "deconv",
        model,
        images=[images],
        out=tmp_path,
        overview=False,
        device="cpu",
        channels="0-3",
        top=1,
        poster=False,
        checkpoints=paths,
        evolution_channels="1,2",
    )
    doc = json.loads((tmp_path / "deconv" / "deconv.json").read_text())
    ev = doc["evolution"]
    assert ev["labels"] == ["epoch1", "epoch2"] and ev["channels"] == [1, 2]
    assert len(ev["cells"]) == 2 and all(len(row) == 2 for row in ev["cells"])
    npz = np.load(tmp_path / "deconv" / "deconv.npz")
    assert npz["evolution_projections"].shape == (2, 2, 3, 32, 32)
    assert (tmp_path / "deconv" / "fig4_evolution.png").exists()
    with pytest.raises(ConvlensError, match="no such checkpoint"):
        convlens.run_probe(
            "deconv",
            model,
            images=[images],
            out=tmp_path,
            overview=False,
            device="cpu",
            poster=False,
            checkpoints=[tmp_path / "missing.pt"],
        )


def test_feature_evolution_finds_each_snapshots_strongest_activation(tmp_path):
    snaps = [("epoch 1", tiny(seed=1)), ("epoch 5", tiny(seed=5))]
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = feature_evolution(snaps, x, "conv2", [0, 6], tmp_path / "evo.png")
    json.dumps(out)
    assert out["labels"] == ["epoch 1", "epoch 5"] and Path(out["png"]).exists()
    for s, (_, m) in enumerate(snaps):
        with torch.no_grad(), record(m, ["conv2"], switches=False, trace=False) as rec:
            m(x)
        act = rec["conv2"]
        for c, ch in enumerate([0, 6]):
            flat = int(act[:, ch].reshape(-1).argmax())
            img, pos = divmod(flat, act.shape[2] * act.shape[3])
            cell = out["cells"][c][s]
            assert (cell["image"], cell["y"], cell["x"]) == (img, *divmod(pos, act.shape[3]))
            assert cell["activation"] == pytest.approx(float(act[img, ch].max()), rel=1e-6)


def test_compare_renders_both_models_layer1_and_layer2(tmp_path, images, isolated_host):
    host = isolated_host(("deconv", convlens_deconv), ("tiny_models", _models_plugin()))
    convlens.run_probe(
        "deconv",
        tiny(),
        images=[images],
        out=tmp_path,
        overview=False,
        device="cpu",
        channels="0-1",
        top=1,
        poster=False,
        compare="tiny_b",
        host=host,
    )
    doc = json.loads((tmp_path / "deconv" / "deconv.json").read_text())
    c = doc["compare"]
    assert c["model"] == "tiny_b" and c["filters"]["shape"] == [8, 3, 5, 5]
    assert c["main_layer2"]["layer"] == c["compare_layer2"]["layer"] == "conv2"
    npz = np.load(tmp_path / "deconv" / "deconv.npz")
    assert npz["compare_projections"].shape == (12 + 12, 3, 32, 32)  # conv2: 12 channels each
    assert npz["compare_inputs"].shape == (3, 3, 32, 32)
    for name in ("fig6_filters_compare.png", "fig6_compare_layer2.png"):
        assert (tmp_path / "deconv" / name).exists()


def _naive_bands(f: np.ndarray, n: int = 32) -> np.ndarray:
    """Energy fractions by an explicit DFT double sum (no FFT)."""
    c, h, w = f.shape
    energy = np.zeros(3)
    for u in range(n):
        for v in range(n):
            ys, xs = np.arange(h)[:, None], np.arange(w)[None, :]
            basis = np.exp(-2j * np.pi * (u * ys / n + v * xs / n))
            p = sum(abs((f[k] * basis).sum()) ** 2 for k in range(c))
            fu, fv = (u if u < n / 2 else u - n) / n, (v if v < n / 2 else v - n) / n
            rho = np.hypot(fu, fv) / 0.5
            energy[0 if rho < 1 / 3 else 1 if rho < 2 / 3 else 2] += p
    return energy / energy.sum()


def test_filter_bands_match_an_explicit_dft_and_known_filters():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 3, 5, 5))
    ours = band_energies(torch.from_numpy(w))
    for i in range(3):
        np.testing.assert_allclose(ours[i], _naive_bands(w[i]), rtol=1e-9, atol=1e-12)
    flat = np.ones((1, 3, 7, 7))
    checker = np.fromfunction(lambda c, y, x: (-1.0) ** (y + x), (3, 7, 7))[None]
    bands = band_energies(np.concatenate([flat, checker]))
    assert bands[0].argmax() == 0 and bands[1].argmax() == 2 and bands[1][2] > 0.8


def test_filter_diagnostics_flag_dead_and_dominating_filters():
    w = torch.randn(10, 3, 7, 7, generator=torch.Generator().manual_seed(0)) * 0.01
    w[3] *= 20.0  # Fig. 6(a): one feature dominates
    w[7] *= 0.01  # dead
    act = torch.rand(2, 10, 5, 5) + 0.5
    act[:, 1] = 1e-4  # dead by activation
    d = filter_diagnostics(w, act)
    assert d["dominating"]["filter"] == 3 and d["dominating"]["dominates"]
    assert d["dead_by_rms"] == [7] and d["dead_by_activation"] == [1] and d["dead"] == [1, 7]
    rms = w.pow(2).mean(dim=(1, 2, 3)).sqrt()
    np.testing.assert_allclose(d["rms"], rms.numpy(), rtol=1e-6)
    assert not filter_diagnostics(torch.randn(10, 3, 7, 7))["dominating"]["dominates"]


def test_probe_errors_are_one_line(tmp_path, images):
    model = tiny()
    for kwargs, match in (
        ({"neuron": ["x"]}, "IMAGE,CHANNEL"),
        ({"neuron": ["9,0,0,0"]}, "out of range"),
        ({"neuron": ["0,1,5,0"]}, "outside"),
        ({"layer": "conv9"}, "not found"),
        ({"channels": "0,99"}, "99"),
        ({"top": 0}, "--top"),
    ):
        with pytest.raises(ConvlensError, match=match):
            convlens.run_probe(
                "deconv",
                model,
                images=[images],
                out=tmp_path,
                overview=False,
                device="cpu",
                poster=False,
                **kwargs,
            )


def test_cli_probe_deconv_on_zfnet_mini(tmp_path, images):
    img = sorted(images.iterdir())[0]
    res = run_cli(
        [
            "probe",
            "deconv",
            "--model",
            "zfnet_mini",
            "--images",
            str(img),
            "--channels",
            "0-2",
            "--top",
            "2",
            "--no-poster",
            "--out",
            str(tmp_path),
        ],
        env={"OMP_NUM_THREADS": "1"},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "RANDOM weights" in res.stderr
    doc = json.loads((tmp_path / "deconv" / "deconv.json").read_text())
    assert doc["layer"] == "conv5" and doc["method"] == "chain" and doc["random_weights"]
    assert [ld["layer"] for ld in doc["layers"]] == [f"conv{i}" for i in range(1, 6)]
    # one image given: the rule is still measured, on the bundled photos, and said on stderr
    assert doc["image_specificity"] is not None and doc["rule"] == "deconvnet"
    assert "note: deconv conv5: rule deconvnet" in res.stderr
    npz = np.load(tmp_path / "deconv" / "deconv.npz")
    h, w = doc["layers"][-1]["crop_size"]
    assert npz["layer4_projections"].shape == (3, 3, h, w)
    assert npz["fixed_inputs"].shape == (1, 3, 224, 224)


def test_no_images_mines_the_embedded_set_and_the_poster_uses_the_bundled_photos(
    tmp_path, monkeypatch
):
    from convlens.data import default_images

    monkeypatch.setenv("CONVLENS_CACHE", str(tmp_path / "cache"))
    res = convlens.run_probe(
        "deconv", tiny(), out=tmp_path, overview=False, device="cpu", top=9,
        render_channels=2, poster_images=3,
    )  # fmt: skip
    doc = res.data["doc"]
    assert doc["mining"]["source"] == "embedded mining set"
    assert doc["mining"]["images"] >= 500
    assert doc["fixed_images"] == [str(p) for p in default_images()[:3]]
    for ld in doc["layers"]:
        assert ld["distinct_images"] == 9  # top-9 from 9 different images
        assert len(ld["channels"]) == 2
        tops = [e for e in doc["projections"] if e["kind"] == "topk" and e["layer"] == ld["layer"]]
        for ch in ld["channels"]:
            imgs = [e["image"] for e in tops if e["channel"] == ch]
            assert len(imgs) == len(set(imgs)) == 9
            assert all("mining-v1" in i for i in imgs)


def test_fig2_has_no_empty_rows_and_says_when_fewer_than_k_images_exist(tmp_path, images):
    from convlens_deconv._probe import _fig2_text
    from convlens_deconv._render import UnitTiles, fig2_canvas

    res = convlens.run_probe(
        "deconv", tiny(), images=[images], out=tmp_path, overview=False, device="cpu",
        layer="conv3", top=9, channels="0,1", poster=False,
    )  # fmt: skip
    doc = res.data["doc"]
    ld = doc["layers"][0]
    assert ld["distinct_images"] == 3  # the fixture holds 3 images
    title, caption = _fig2_text(doc, ld, "tiny", 2, 3)
    assert any("Only 3 distinct image(s)" in c for c in caption)
    assert "conv3" in title[0] and f"rule: {ld['rule']}" in title[1]
    tile = np.zeros((10, 10, 3))
    one_row = fig2_canvas([UnitTiles(0, [tile] * 3, [tile] * 3, [1.0] * 3)], title, caption)
    three_rows = fig2_canvas([UnitTiles(0, [tile] * 9, [tile] * 9, [1.0] * 9)], title, caption)
    assert three_rows.height - one_row.height == 2 * (10 + 2)  # two more rows of tiles, no more
    from PIL import Image

    png = Image.open(tmp_path / "deconv" / "fig2_0_conv3.png")
    assert png.mode == "RGB" and png.width >= 520
