"""Fig. 5's transforms against independent references (slicing, torch.rot90, F.interpolate),
and the distances/probabilities against plain forward hooks."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from convlens_invariance import amounts_for, invariance, resized_tensor, translation_growth, warp
from PIL import Image

from convlens.data import Preprocess
from convlens.errors import ConvlensError
from convlens.testing import tiny_model


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx / w, yy / h, (xx * yy) / (w * h)], -1) * 200
    arr = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def test_identity_reproduces_the_model_crop():
    pre = Preprocess(input_size=(24, 24), resize=28)
    img = _photo(50, 37)
    out = warp(resized_tensor(img, pre), pre.crop_box(*img.size), "rotate", [0.0])
    torch.testing.assert_close(out[0], pre(img), atol=1e-5, rtol=0)


@pytest.mark.parametrize("canvas", ["mean", "border"])
def test_vertical_translation_is_a_shifted_slice(canvas):
    pre = Preprocess(input_size=(20, 20), resize=24)
    img = _photo(30, 24, seed=1)
    resized = resized_tensor(img, pre)
    left, top, right, bottom = pre.crop_box(*img.size)
    hr = resized.shape[1]
    shifts = [-7, 0, 3, 15]
    out = warp(resized, (left, top, right, bottom), "translate", shifts, canvas)
    for k, t in enumerate(shifts):
        want = torch.zeros(3, 20, 20)
        for y in range(20):
            src = top + y - t  # content moves down by t
            if 0 <= src < hr:
                want[:, y] = resized[:, src, left:right]
            elif canvas == "border":
                want[:, y] = resized[:, min(max(src, 0), hr - 1), left:right]
        torch.testing.assert_close(out[k], want, atol=1e-5, rtol=0)


def test_rotation_by_right_angles_is_rot90_counter_clockwise():
    pre = Preprocess(input_size=(16, 16), resize=16)  # the crop is the whole image
    img = _photo(16, 16, seed=2)
    resized = resized_tensor(img, pre)
    out = warp(resized, pre.crop_box(16, 16), "rotate", [90.0, 180.0, 270.0])
    for k in range(3):
        want = torch.rot90(resized, k + 1, dims=(-2, -1))
        torch.testing.assert_close(out[k], want, atol=1e-5, rtol=0)
    # counter-clockwise on screen: the top-right corner moves to the top-left
    assert torch.equal(torch.rot90(resized, 1, (-2, -1))[:, 0, 0], resized[:, 0, -1])


def test_scaling_zooms_about_the_centre_and_fills_the_canvas():
    pre = Preprocess(input_size=(16, 16), resize=16)
    img = _photo(16, 16, seed=3)
    resized = resized_tensor(img, pre)
    zoom, shrink = warp(resized, pre.crop_box(16, 16), "scale", [2.0, 0.5])
    ref = F.interpolate(
        resized[None, :, 4:12, 4:12], scale_factor=2, mode="bilinear", align_corners=False
    )[0]
    # the reference clamps at the central crop's border; inside, both sample the same points
    torch.testing.assert_close(zoom[:, 1:-1, 1:-1], ref[:, 1:-1, 1:-1], atol=1e-5, rtol=0)
    # shrunk to half: a ring of 4 pixels lies beyond the photo and holds the mean (0 here)
    ring = torch.ones(16, 16, dtype=torch.bool)
    ring[4:12, 4:12] = False
    assert torch.count_nonzero(shrink[:, ring]) == 0
    assert torch.count_nonzero(shrink[:, 5:11, 5:11]) > 0


def test_amount_grids():
    assert amounts_for("translate") == [-60.0, -40.0, -20.0, 0.0, 20.0, 40.0, 60.0]
    assert amounts_for("rotate")[0] == 0.0 and amounts_for("rotate")[-1] == 350.0
    assert amounts_for("scale")[0] == 0.5 and amounts_for("scale")[-1] == 1.6
    assert amounts_for("translate", 5) == [-60.0, -30.0, 0.0, 30.0, 60.0]
    assert amounts_for("scale", 4) == pytest.approx([0.5, 0.8666667, 1.0, 1.2333333, 1.6])
    with pytest.raises(ConvlensError):
        amounts_for("shear")
    with pytest.raises(ConvlensError):
        amounts_for("rotate", 1)


def _chain():
    model, _ = tiny_model("chain")
    model.convlens_info = types.SimpleNamespace(
        input_size=(3, 32, 32),
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        interpolation="bilinear",
        crop_pct=0.8,
    )
    return model


def _plain(model, x, names):
    modules = dict(model.named_modules())
    got, handles = {}, []
    for layer in names:
        target = model.convlens_aliases.get(layer, layer)

        def hook(_m, _i, out, layer=layer):
            got[layer] = out.detach().reshape(out.shape[0], -1).double()

        handles.append(modules[target].register_forward_hook(hook))
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for h in handles:
            h.remove()
    return got, logits.double().softmax(-1)


def test_distances_and_probabilities_match_plain_hooks():
    model = _chain()
    pre = Preprocess.for_model(model)
    img = _photo(48, 40, seed=4)
    shifts = [-8.0, 0.0, 5.0]
    res = invariance(
        model,
        [img],
        ["conv1", "conv3"],
        transforms=["translate"],
        amounts={"translate": shifts},
        labels=[2],
    )
    # independent inputs: slices of the resized photo, zero (the mean) beyond its edges
    resized = resized_tensor(img, pre)
    left, top, right, bottom = pre.crop_box(*img.size)
    xs = torch.zeros(1 + len(shifts), 3, 32, 32)
    for k, t in enumerate([0.0, *shifts]):
        for y in range(32):
            src = top + y - int(t)
            if 0 <= src < resized.shape[1]:
                xs[k, :, y] = resized[:, src, left:right]
    feats, probs = _plain(model, xs, ["conv1", "conv3"])
    curve = res.curves["translate"][0]
    for layer in ("conv1", "conv3"):
        want = [
            float(np.linalg.norm((feats[layer][k + 1] - feats[layer][0]).numpy()))
            for k in range(len(shifts))
        ]
        np.testing.assert_allclose(curve["distance"][layer], want, rtol=1e-4, atol=1e-5)
        assert curve["distance"][layer][1] == 0.0  # the identity, in the same batch: exactly 0
        assert min(curve["distance"][layer][0], curve["distance"][layer][2]) > 0
    np.testing.assert_allclose(curve["prob"], probs[1:, 2].numpy(), rtol=1e-4, atol=1e-6)
    assert res.labels == [2] and res.label_source == "given"
    assert res.base_probs[0] == pytest.approx(float(probs[0, 2]), rel=1e-4)


def test_default_label_is_the_untransformed_top1_and_labels_are_checked():
    model = _chain()
    img = _photo(40, 40, seed=5)
    res = invariance(model, [img], ["conv1"], transforms=["rotate"], amounts={"rotate": [0, 90]})
    _, probs = _plain(model, Preprocess.for_model(model)(img)[None], [])
    assert res.labels == [int(probs[0].argmax())]
    assert res.label_source.startswith("top-1")
    with pytest.raises(ConvlensError, match="classes"):
        invariance(
            model, [img], ["conv1"], transforms=["rotate"], amounts={"rotate": [0]}, labels=[99]
        )


def test_translation_growth_normalises_by_the_largest_shift():
    model = _chain()
    res = invariance(
        model,
        [_photo(40, 40, 6), _photo(40, 40, 7)],
        ["conv1", "conv3"],
        transforms=["translate"],
        amounts={"translate": [-10, -4, 0, 4, 10]},
    )
    g = translation_growth(res)
    for layer in ("conv1", "conv3"):
        d = np.array([c["distance"][layer] for c in res.curves["translate"]])
        want = np.mean((d[:, [1, 3]]) / d[:, [0, 4]].mean(axis=1, keepdims=True))
        assert g[layer] == pytest.approx(want)
    # one shift size only (and no translation at all): nothing to compare, no number
    one = invariance(
        model,
        [_photo(40, 40, 6)],
        ["conv1"],
        transforms=["translate", "scale"],
        amounts={"translate": [-10, 0, 10], "scale": [0.5, 1.0]},
    )
    assert translation_growth(one) is None
    assert (
        translation_growth(
            invariance(
                model,
                [_photo(40, 40, 6)],
                ["conv1"],
                transforms=["scale"],
                amounts={"scale": [1.0, 2.0]},
            )
        )
        is None
    )
