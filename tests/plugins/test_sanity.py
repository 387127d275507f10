"""The ``sanity`` probe: deletion/insertion curves against a naive per-step loop, the cascade's
similarities against SciPy and scikit-image, the Captum baselines against Captum called directly,
every number recomputed from ``sanity.json``/``sanity.npz``."""

from __future__ import annotations

import json

import convlens_sanity
import numpy as np
import pytest
import torch
from convlens_sanity import (
    MAPS,
    MapSettings,
    auc,
    cascade_plan,
    compute_maps,
    cross_image_correlation,
    curves,
    model_blocks,
    randomised,
)
from convlens_sanity._probe import IMAGE_THRESHOLD, RANDOMISATION_THRESHOLD, _verdicts
from scipy.stats import pearsonr, spearmanr
from skimage.metrics import structural_similarity
from typer.testing import CliRunner

from convlens import run_probe
from convlens.plugins import PluginHost
from convlens.testing import tiny_probe_model


@pytest.fixture
def tiny():
    return tiny_probe_model("chain", lrn=False)


def _inputs(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g)


def _naive_curve(model, x, m, t, fill, steps, kind, start):
    """One forward per step; the pixel order from Python's sort (value descending, index)."""
    h, w = m.shape
    values = m.astype(np.float32).ravel().tolist()
    order = sorted(range(h * w), key=lambda i: (-values[i], i))
    out = []
    for k in range(steps + 1):
        n_changed = int(np.round(k * h * w / steps))
        img = x.clone() if kind == "deletion" else start.clone()
        for p in order[:n_changed]:
            r, c = divmod(p, w)
            if kind == "deletion":
                img[:, r, c] = torch.tensor(fill)
            else:
                img[:, r, c] = x[:, r, c]
        with torch.no_grad():
            out.append(float(model(img[None]).softmax(1)[0, t]))
    return np.array(out)


def test_curves_equal_a_naive_per_step_loop(tiny, one_thread):
    x = _inputs(2)
    rng = np.random.default_rng(1)
    m = rng.random((2, 32, 32)).astype(np.float16)
    m[0, :4] = 0.5  # ties, broken by pixel index
    fill, targets, steps = (0.1, -0.2, 0.3), [1, 4], 7
    start = convlens_sanity.blurred(x)
    got = curves(tiny, x, m, targets, fill, steps, batch_size=5, start=start)
    for kind in ("deletion", "insertion"):
        for i in range(2):
            ref = _naive_curve(tiny, x[i], m[i], targets[i], fill, steps, kind, start[i])
            assert np.allclose(got[kind][i], ref, atol=1e-6), kind
            assert auc(got[kind][i]) == pytest.approx(np.trapezoid(ref, dx=1 / steps), abs=1e-6)
    # the first deletion step is the image itself, the last the fill everywhere
    with torch.no_grad():
        p0 = tiny(x).softmax(1)[[0, 1], targets]
    assert np.allclose(got["deletion"][:, 0], p0.numpy(), atol=1e-6)


def test_blur_is_torchvision_gaussian():
    from torchvision.transforms.functional import gaussian_blur

    x = _inputs(1)
    sigma = 5.0 * 32 / 224
    k = 2 * int(np.ceil(2 * sigma)) + 1
    assert torch.allclose(convlens_sanity.blurred(x), gaussian_blur(x, [k, k], [sigma, sigma]))


def _settings(model, **kw):
    base = dict(window=9, stride=5, fill=(0.0, 0.0, 0.0), gradcam_layer="features.conv3")
    base.update(kw)
    return MapSettings(**base)


def _norm(a):
    a = a.detach().float()
    return (a / a.abs().flatten(1).amax(1).clamp_min(1e-30)[:, None, None]).numpy()


def test_captum_baselines_equal_captum_called_directly(tiny):
    from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam

    x, t = _inputs(3), torch.tensor([0, 2, 4])
    got = compute_maps(tiny, x, t.tolist(), ["gradcam", "ig"], _settings(tiny, ig_steps=9))
    cam = LayerGradCam(tiny, tiny.features.conv3).attribute(x, target=t, relu_attributions=True)
    cam = LayerAttribution.interpolate(cam, (32, 32), "bilinear")[:, 0]
    ig = IntegratedGradients(tiny).attribute(x, baselines=torch.zeros_like(x), target=t,
                                             n_steps=9).abs().sum(1)  # fmt: skip
    assert np.allclose(got["gradcam"].astype(np.float32), _norm(cam), atol=1e-3)
    assert np.allclose(got["ig"].astype(np.float32), _norm(ig), atol=1e-3)


def test_rule_maps_equal_captum_and_autograd(tiny):
    from captum.attr import Deconvolution, GuidedBackprop, Saliency

    x, t = _inputs(2), torch.tensor([3, 1])
    got = compute_maps(tiny, x, t.tolist(), ["deconvnet", "guided", "gradient"], _settings(tiny))
    refs = {
        "deconvnet": Deconvolution(tiny).attribute(x, target=t),
        "guided": GuidedBackprop(tiny).attribute(x, target=t),
        "gradient": Saliency(tiny).attribute(x, target=t, abs=True),
    }
    for name, ref in refs.items():
        assert np.allclose(got[name].astype(np.float32), _norm(ref.abs().sum(1)), atol=1e-3), name


def test_occlusion_map_is_the_mean_drop_over_covering_squares(tiny):
    x, t = _inputs(1), 2
    s = _settings(tiny, window=9, stride=7, fill=(0.3, 0.3, 0.3))
    got = compute_maps(tiny, x, [t], ["occlusion"], s)["occlusion"][0].astype(np.float32)
    with torch.no_grad():
        p0 = float(tiny(x).softmax(1)[0, t])
    total, count = np.zeros((32, 32)), np.zeros((32, 32))
    for y0 in range(0, 32 - 9 + 7, 7):  # Captum's grid: the last square is clipped
        for x0 in range(0, 32 - 9 + 7, 7):
            img = x.clone()
            img[:, :, y0 : y0 + 9, x0 : x0 + 9] = 0.3
            with torch.no_grad():
                p = float(tiny(img).softmax(1)[0, t])
            total[y0 : y0 + 9, x0 : x0 + 9] += p0 - p
            count[y0 : y0 + 9, x0 : x0 + 9] += 1
    ref = total / np.maximum(count, 1)
    ref /= np.abs(ref).max()
    assert np.allclose(got, ref, atol=2e-3)


def test_blocks_follow_the_forward_order_and_the_cascade_is_cumulative(tiny):
    blocks = model_blocks(tiny, _inputs(1))
    assert [b.name for b in blocks] == ["features.conv1", "features.conv2", "features.conv3", "fc"]
    plan = cascade_plan(blocks, 2)
    assert [[b.name for b in s] for s in plan] == [
        ["fc", "features.conv3"],
        ["fc", "features.conv3", "features.conv2", "features.conv1"],
    ]
    assert len(cascade_plan(blocks, 99)) == 4  # at most one step per block


def test_timm_blocks_are_the_stage_blocks():
    import timm

    model = timm.create_model("resnet18", num_classes=3).eval()
    names = [b.name for b in model_blocks(model, torch.randn(1, 3, 32, 32))]
    assert names == ["conv1", "bn1", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0",
                     "layer3.1", "layer4.0", "layer4.1", "fc"]  # fmt: skip


def test_randomised_copies_the_model_and_reinitialises_only_the_chosen_blocks(tiny):
    blocks = model_blocks(tiny, _inputs(1))
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    a = randomised(tiny, blocks[-2:], seed=3)
    b = randomised(tiny, blocks[-2:], seed=3)
    for k, v in tiny.state_dict().items():
        assert torch.equal(v, before[k])  # the user's model is untouched
        assert torch.equal(a.state_dict()[k], b.state_dict()[k])  # seeded
        changed = not torch.equal(a.state_dict()[k], v)
        assert changed == k.startswith(("fc.", "features.conv3.")), k


def test_cross_image_correlation_is_the_mean_pairwise_pearson():
    rng = np.random.default_rng(0)
    m = rng.normal(size=(4, 8, 8))
    a = np.abs(m).reshape(4, -1)
    ref = np.mean([pearsonr(a[i], a[j]).statistic for i in range(4) for j in range(i + 1, 4)])
    assert cross_image_correlation(m) == pytest.approx(ref, abs=1e-12)
    same = np.repeat(m[:1], 3, axis=0)
    assert cross_image_correlation(same) == pytest.approx(1.0)
    assert cross_image_correlation(m[:1]) is None


def test_verdicts_flag_what_the_thresholds_say():
    n = 3
    flat = {"deletion": np.full((n, 5), 0.2), "insertion": np.full((n, 5), 0.2)}
    good = {"deletion": np.zeros((n, 5)), "insertion": np.ones((n, 5))}
    rng = np.random.default_rng(0)
    maps = {"a": rng.random((n, 8, 8)), "b": np.repeat(rng.random((1, 8, 8)), n, 0),
            "random": rng.random((n, 8, 8))}  # fmt: skip
    casc = {
        "plan": [[0], [0, 1]],
        "spearman": {
            "a": np.full((2, 2), RANDOMISATION_THRESHOLD - 0.01),
            "b": np.array([[0.95, 0.9], [0.2, 0.1]]),
        },  # fmt: skip
        "ssim": {"a": np.zeros((2, 2)), "b": np.zeros((2, 2))},
    }
    v = _verdicts(["a", "b"], maps, {"a": good, "b": flat, "random": flat}, casc)
    assert v["a"]["fails_randomisation"] is False and v["a"]["beats_random"]
    assert v["b"]["fails_randomisation"] is True  # mean over steps 0.54 >= 0.5
    assert v["b"]["last_spearman"] == pytest.approx(0.15)
    assert v["b"]["image_independent"] and not v["a"]["image_independent"]
    assert not v["b"]["beats_random"]
    assert "fails the randomisation check" in v["b"]["verdict"]
    assert "same picture for every image" in v["b"]["verdict"]


def test_probe_numbers_are_recomputable_from_its_files(tmp_path, images, tiny):
    host = PluginHost(entry_points=False, extra=[("sanity", convlens_sanity)])
    run_probe("sanity", tiny, images=[images], out=tmp_path, host=host, steps=5, cascade=2,
              cascade_images=2, window=9, stride=5, ig_steps=4)  # fmt: skip
    d = tmp_path / "sanity"
    meta = json.loads((d / "sanity.json").read_text())
    z = np.load(d / "sanity.npz")
    x = torch.from_numpy(z["inputs"])
    targets = z["targets"].tolist()
    assert x.shape == (3, 3, 32, 32) and meta["targets"] == targets
    with torch.no_grad():
        assert targets == tiny(x).argmax(1).tolist()  # each image's top-1
    fill = meta["settings"]["removal"]["model_space"]
    start = convlens_sanity.blurred(x)
    assert set(meta["maps"]) == {*MAPS, "random"}
    for name in [*MAPS, "random"]:
        m = z[f"map_{name}"]
        assert m.dtype == np.float16 and m.shape == (3, 32, 32)
        for i in range(3):  # the curves: a naive loop from the recorded map and input
            for kind in ("deletion", "insertion"):
                ref = _naive_curve(tiny, x[i], m[i], targets[i], fill, 5, kind, start[i])
                assert np.allclose(z[f"{kind}_{name}"][i], ref, atol=1e-5)
                rec = meta["maps"][name]["per_image"][f"{kind}_auc"][i]
                assert rec == pytest.approx(np.trapezoid(ref, dx=1 / 5), abs=1e-5)
        if name == "random":
            continue
        v = meta["maps"][name]
        sp, ss = np.zeros((2, 2)), np.zeros((2, 2))
        for s in range(2):  # the cascade: SciPy and scikit-image on the recorded maps
            for i in range(2):
                a = np.abs(m[i].astype(np.float64))
                b = np.abs(z[f"cascade_{name}"][s, i].astype(np.float64))
                sp[s, i] = 0.0 if np.ptp(a) == 0 or np.ptp(b) == 0 else spearmanr(
                    a.ravel(), b.ravel()).statistic  # fmt: skip
                ss[s, i] = structural_similarity(a / max(a.max(), 1e-30), b / max(b.max(), 1e-30),
                                                 data_range=1.0)  # fmt: skip
        assert np.allclose(v["randomisation"]["per_image_spearman"], sp, atol=1e-9)
        assert np.allclose(v["randomisation"]["per_image_ssim"], ss, atol=1e-9)
        assert v["fails_randomisation"] == (sp.mean() >= RANDOMISATION_THRESHOLD)
        r = cross_image_correlation(m)
        assert v["cross_image_correlation"] == pytest.approx(r)
        assert v["image_independent"] == (r >= IMAGE_THRESHOLD)
    # the cascade's last step re-initialised every block
    steps = meta["cascade"]["steps"]
    assert steps[-1]["blocks"] == len(meta["cascade"]["blocks"]) == 4
    section = json.loads((d / "section.json").read_text())
    assert "deletion AUC" in section["html"] and "Randomisation check" in section["html"]
    for fig in ("sanity_curves.png", "sanity_cascade.png", "sanity_images.png"):
        assert (d / fig).stat().st_size > 10_000


def test_deconvnet_on_a_net_without_max_pooling_is_flagged_image_independent(tmp_path):
    """The readable-projections finding: on a net without max pooling the deconvnet's picture
    does not depend on the image; the probe must say so."""
    model = tiny_probe_model("resnet")  # strided convs, BatchNorm, no max pooling
    host = PluginHost(entry_points=False, extra=[("sanity", convlens_sanity)])
    res = run_probe("sanity", model, out=tmp_path, host=host,  # the bundled photos
                    maps="deconvnet,gradient", steps=3, cascade=0)  # fmt: skip
    meta = json.loads((tmp_path / "sanity" / "sanity.json").read_text())
    assert meta["maps"]["deconvnet"]["cross_image_correlation"] > 0.99
    assert meta["maps"]["deconvnet"]["image_independent"] is True
    grad = meta["maps"]["gradient"]["cross_image_correlation"]
    assert grad < meta["maps"]["deconvnet"]["cross_image_correlation"] - 0.1
    assert "same picture for every image" in res.summary["deconvnet"]
    assert not (tmp_path / "sanity" / "sanity_cascade.png").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--maps", "occlusion,bogus"], "--maps: unknown map 'bogus'"),
        (["--window", "5000"], "--window 5000"),
        (["--steps", "1"], "--steps"),
        (["--target", "99999"], "--target 99999"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, images, args, message):
    from convlens.cli import build_app

    r = CliRunner().invoke(build_app(), ["probe", "sanity", "--model", "zfnet_mini", "--images",
                                         str(images), "--out", str(tmp_path / "o"), *args])  # fmt: skip
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert len([ln for ln in r.output.splitlines() if "error" in ln.lower()]) == 1
    assert not (tmp_path / "o" / "sanity").exists()
