"""Section 4.3's Delta, the masks and the layer choice, against independent computations."""

from __future__ import annotations

import itertools
import types
import warnings

import numpy as np
import pytest
import torch
from convlens_correspondence import (
    FACE_PARTS,
    PartImage,
    apply_masks,
    correspondence,
    delta,
    embedded_faces,
    map_box,
    paper_layers,
    sign_hamming,
)
from convlens_correspondence.delta import jitter_box, random_box
from PIL import Image, ImageDraw
from torch import nn

from convlens.data import Preprocess, lfw_faces
from convlens.errors import ConvlensError
from convlens.testing import tiny_model


def _naive_hamming(eps: np.ndarray) -> np.ndarray:
    """H[i, j] by explicit loops, with a hand-written sign."""

    def sgn(v: float) -> int:
        return 1 if v > 0 else (-1 if v < 0 else 0)

    n, d = eps.shape
    h = np.zeros((n, n), dtype=np.int64)
    for i, j in itertools.product(range(n), range(n)):
        h[i, j] = sum(sgn(eps[i, k]) != sgn(eps[j, k]) for k in range(d))
    return h


def _tie_heavy(seed: int, n: int = 5, d: int = 37) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    eps = torch.randint(-2, 3, (n, d), generator=g).float()  # many exact zeros
    eps[:, :5] = 0.0  # units no image changes: ties everywhere
    eps[1, 5:9] = -0.0  # negative zero is sign 0 too
    return eps


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sign_hamming_matches_naive_loop_with_ties(seed):
    eps = _tie_heavy(seed)
    got = sign_hamming(eps).numpy()
    want = _naive_hamming(eps.numpy())
    np.testing.assert_array_equal(got, want)
    assert (np.diag(got) == 0).all() and (got == got.T).all()


def test_delta_normalisation_and_raw_sum_against_naive():
    eps = _tie_heavy(7, n=4, d=23)
    h = _naive_hamming(eps.numpy())
    n, d = eps.shape
    out = delta(eps)
    raw = sum(h[i, j] for i in range(n) for j in range(n) if i != j)
    assert out["raw"] == raw
    assert out["value"] == pytest.approx(raw / (n * (n - 1) * d), abs=1e-15)
    pairs = [h[i, j] / d for i in range(n) for j in range(i + 1, n)]
    assert out["pair_std"] == pytest.approx(float(np.std(pairs)), abs=1e-12)
    np.testing.assert_allclose(out["pairs"], h / d)


def test_delta_extremes_zero_sign_counts_as_a_value():
    same = torch.tensor([[1.0, -2.0, 0.0], [3.0, -1.0, 0.0], [0.5, -0.5, 0.0]])
    assert delta(same)["value"] == 0.0
    # 0 against +1 differs; +1 against -1 differs; three units, every one differs
    opposite = torch.tensor([[1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]])
    assert delta(opposite)["value"] == 1.0
    with pytest.raises(ConvlensError):
        delta(torch.ones(1, 4))


def _square_info(size: int) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        input_size=(3, size, size),
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        interpolation="bilinear",
        crop_pct=1.0,
    )


class LeftHalfNet(nn.Module):
    """Its features see only the left half of a 32x32 input."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4 * 32 * 16, 3)
        self.convlens_info = _square_info(32)

    def forward(self, x):
        return self.fc(self.relu(self.conv(x[..., : x.shape[-1] // 2])).flatten(1))


def _noise_image(seed: int, size: int = 32) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_masking_a_part_no_feature_sees_changes_nothing():
    model = LeftHalfNet().eval()
    items = [
        PartImage(
            f"im{i}",
            "synthetic",
            _noise_image(i),
            {"unseen": (20.0, 4.0, 28.0, 12.0), "seen": (2.0, 4.0, 10.0, 12.0)},
        )
        for i in range(3)
    ]
    res = correspondence(model, items, ["conv", "relu"], random=0)
    unseen = next(r for r in res.rows if r.name == "unseen")
    seen = next(r for r in res.rows if r.name == "seen")
    for layer in ("conv", "relu"):
        s = unseen.scores[layer][0]
        assert s["raw"] == 0 and s["value"] == 0.0
        assert not np.any(s["pairs"])
        # the seen part does change features inconsistently: the test can fail
        assert seen.scores[layer][0]["value"] > 0.01
    # and the features themselves are bit-identical
    from convlens_correspondence import extract

    base, _ = extract(model, res.inputs, ["conv"])
    masked, _ = extract(model, res.masked(unseen), ["conv"])
    assert torch.equal(base["conv"], masked["conv"])


def test_identical_images_give_zero_delta_for_every_part():
    model, _ = tiny_model("chain")
    model.convlens_info = _square_info(32)
    img = _noise_image(3)
    parts = {"a": (3.0, 3.0, 11.0, 9.0), "b": (15.0, 18.0, 25.0, 28.0), "c": (0.0, 0.0, 32.0, 4.0)}
    items = [PartImage(f"copy{i}", "synthetic", img.copy(), dict(parts)) for i in range(4)]
    res = correspondence(model, items, ["conv1", "conv2", "conv3"], random=2, seed=0)
    for row in res.rows:
        if row.kind != "part":
            continue
        for layer in res.layers:
            assert row.scores[layer][0]["value"] == 0.0, (row.name, layer)
    # random masks sit at different places in the copies: not zero, so the check can fail
    rnd = next(r for r in res.rows if r.kind == "random")
    assert max(s["value"] for s in rnd.scores["conv2"]) > 0.0


@pytest.mark.parametrize(
    ("size", "box"),
    [((25, 25), (3, 7, 9, 11)), ((120, 80), (30.5, 20, 67, 61.25)), ((64, 200), (5, 80, 55, 120))],
)
def test_map_box_covers_the_box_as_the_preprocessing_moves_it(size, box):
    """Draw the box white on black, push the picture through the real preprocessing, and check
    the mapped box is the tightest whole-pixel box around the (interpolated) white region."""
    pre = Preprocess(input_size=(48, 48), resize=56, interpolation="nearest")
    w, h = size
    scale = 8  # draw at 8x so that fractional edges are exact
    big = Image.new("L", (w * scale, h * scale), 0)
    ImageDraw.Draw(big).rectangle(
        [box[0] * scale, box[1] * scale, box[2] * scale - 1, box[3] * scale - 1], fill=255
    )
    # box-filter back to the image's resolution: coverage of each pixel, then the model's crop
    # of the same area with an area-weighted resize (coverage > 0 means the box touches it)
    rw, rh = pre.resized_size(w, h)
    left, top, right, bottom = pre.crop_box(w, h)
    cover = np.asarray(big.resize((rw, rh), Image.Resampling.BOX), dtype=np.float64)
    cover = cover[top:bottom, left:right]
    ys, xs = np.nonzero(cover > 0.5)  # > 0.5: the pixel's area is touched
    want = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    got, clipped = map_box(box, size, pre)
    assert got == want
    assert not clipped


def test_map_box_clips_and_rejects_boxes_outside_the_crop():
    pre = Preprocess(input_size=(32, 32), resize=32)
    box, clipped = map_box((0, 0, 40, 10), (64, 32), pre)  # 64x32 → crop x 16..48
    assert box == (0, 0, 24, 10) and clipped
    with pytest.raises(ConvlensError, match="outside"):
        map_box((0, 0, 10, 10), (64, 32), pre)


def test_apply_masks_sets_exactly_the_boxes():
    x = torch.randn(3, 3, 10, 12)
    out = apply_masks(x, [(1, 2, 4, 5), None, (0, 0, 12, 1)], (7.0, 8.0, 9.0))
    expect = x.clone()
    for c, v in enumerate((7.0, 8.0, 9.0)):
        expect[0, c, 2:5, 1:4] = v
        expect[2, c, 0:1, 0:12] = v
    assert torch.equal(out, expect)
    assert torch.equal(x, x.clone())  # input untouched


def test_random_and_jittered_boxes_stay_inside():
    rng = np.random.default_rng(0)
    region = (5, 6, 30, 20)
    for _ in range(200):
        b = random_box(rng, (7, 4), region)
        assert b[2] - b[0] == 7 and b[3] - b[1] == 4
        assert region[0] <= b[0] and b[2] <= region[2] and region[1] <= b[1] and b[3] <= region[3]
        j = jitter_box(rng, (0, 0, 10, 6), 0.5, (32, 32))
        assert j[2] - j[0] == 10 and j[3] - j[1] == 6 and j[0] >= 0 and j[1] >= 0
        assert j[0] <= 5 and j[1] <= 3
    assert random_box(rng, (50, 50), region) == (5, 6, 30, 20)  # shrunk to the region


def test_random_baseline_is_seeded_sized_like_the_parts_and_inside_the_object():
    model, _ = tiny_model("chain")
    model.convlens_info = _square_info(32)
    parts = {"p": (2.0, 2.0, 8.0, 6.0), "q": (20.0, 20.0, 24.0, 30.0)}
    items = [
        PartImage(f"im{i}", "synthetic", _noise_image(i), dict(parts), object_box=(1, 1, 31, 31))
        for i in range(3)
    ]

    def boxes(seed):
        res = correspondence(model, items, ["conv2"], random=4, seed=seed)
        return next(r for r in res.rows if r.kind == "random").draws

    a, b, c = boxes(0), boxes(0), boxes(1)
    assert a == b and a != c
    sizes = [(6, 4), (4, 10)]  # the draws cycle through the parts' sizes
    for r, draw in enumerate(a):
        for box in draw:
            assert (box[2] - box[0], box[3] - box[1]) == sizes[r % 2]
            assert 1 <= box[0] and box[2] <= 31 and 1 <= box[1] and box[3] <= 31


def test_correspondence_rejects_bad_settings():
    model, _ = tiny_model("chain")
    model.convlens_info = _square_info(32)
    item = PartImage("a", "s", _noise_image(0), {"p": (1.0, 1.0, 5.0, 5.0)})
    with pytest.raises(ConvlensError, match="at least 2"):
        correspondence(model, [item], ["conv1"])
    with pytest.raises(ConvlensError, match="jitter"):
        correspondence(model, [item, item], ["conv1"], jitter=2.0)
    lone = PartImage("b", "s", _noise_image(1), {"other": (1.0, 1.0, 5.0, 5.0)})
    with pytest.raises(ConvlensError, match="no part"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        correspondence(model, [item, lone], ["conv1"])


def test_embedded_faces_boxes_land_on_eyes_and_nose():
    faces = lfw_faces(None)
    items = embedded_faces()
    assert len(items) == 5 and {it.size for it in items} == {(25, 25)}
    for it, (idx, boxes) in zip(items, FACE_PARTS.items(), strict=True):
        face = faces[idx]
        assert np.allclose(np.asarray(it.image)[..., 0] / 255.0, face, atol=1 / 255)

        def mean(name, face=face, boxes=boxes):
            x0, y0, x1, y1 = boxes[name]
            return face[y0:y1, x0:x1].mean()

        # eyes are darker than the face as a whole; the subject's right eye is on the left
        assert mean("right_eye") < mean("object") and mean("left_eye") < mean("object")
        r, left, nose = boxes["right_eye"], boxes["left_eye"], boxes["nose"]
        assert r[2] <= left[0] + 1 and r[0] < nose[0] < left[0]
        assert nose[3] > max(r[3], left[3])  # the nose ends below the eyes
        for b in (r, left, nose):
            o = boxes["object"]
            assert o[0] <= b[0] and b[2] <= o[2] and o[1] <= b[1] and b[3] <= o[3]


def test_paper_layers_on_zfnet_aliases_and_on_timm_models():
    from convlens.models import create_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zf = create_model("zfnet_mini", input_size=64)
        assert paper_layers(zf, [1, 5, 7]) == ["conv1", "conv5", "fc7"]
        res = create_model("resnet10t")
    # timm resnet10t: the ReLU after the stem's first conv, the last block's output ReLU, the
    # pooled vector that feeds the classifier
    assert paper_layers(res, [1, 5, 7], torch.zeros(1, 3, 64, 64)) == [
        "conv1.2",
        "layer4.0.act2",
        "global_pool.pool",
    ]
