"""Receptive-field crops (one place for every figure that shows a unit's patch) and the robust
contrast of projections, checked against boxes and sums computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from convlens.engine import ReceptiveField
from convlens.render import robust_stretch
from convlens.render.crops import MIN_SIDE, crop_side, cut, mass_side, unit_box, unit_center


def test_local_field_crops_to_the_receptive_field_box_exactly():
    rf = ReceptiveField(size=(7, 7), stride=(2, 2), start=(-3, -3))
    hw = (32, 32)
    side = crop_side(rf, hw)
    assert side == (7, 7)
    assert unit_box(rf, 0, 0, hw, side) == rf.box(0, 0) == (-3, -3, 4, 4)
    assert unit_box(rf, 5, 3, hw, side) == (3, 7, 10, 14)
    cy, cx = unit_center(rf, 5, 3, hw)
    assert (cy, cx) == (10.0, 6.0)


def test_cut_keeps_the_scale_at_the_border_and_fills_outside():
    a = np.arange(2 * 6 * 6, dtype=float).reshape(2, 6, 6)
    out = cut(a, (-2, -1, 3, 4), np.nan)  # x0, y0, x1, y1
    assert out.shape == (2, 5, 5)
    assert np.isnan(out[:, 0]).all() and np.isnan(out[:, :, :2]).all()
    np.testing.assert_array_equal(out[:, 1:, 2:], a[:, 0:4, 0:3])


def test_mass_side_is_the_smallest_centred_square_holding_the_mass():
    p = np.zeros((3, 41, 41))
    p[0, 20, 20] = 5.0
    p[1, 20, 26] = 5.0  # 6 px right of the centre: needs a side of 13
    assert mass_side(p, (20, 20), mass=0.5) == 1
    assert mass_side(p, (20, 20), mass=0.9) == 13
    # brute force over every centred square for a random map
    rng = np.random.default_rng(0)
    q = rng.random((20, 30)) ** 8
    side = mass_side(q, (9, 14), mass=0.9)
    r = (side - 1) // 2
    inside = q[max(9 - r, 0) : 9 + r + 1, max(14 - r, 0) : 14 + r + 1].sum()
    smaller = q[max(9 - r + 1, 0) : 9 + r, max(14 - r + 1, 0) : 14 + r].sum()
    assert inside >= 0.9 * q.sum() > smaller


def test_a_field_as_large_as_the_image_uses_the_projections_effective_field():
    rf = ReceptiveField(size=(300, 300), stride=(32, 32), start=(-120, -120))
    hw = (64, 64)
    p = np.zeros((3, 64, 64))
    c = unit_center(rf, 0, 0, hw)
    cy, cx = int(round(c[0])), int(round(c[1]))
    p[:, cy - 15 : cy + 16, cx - 15 : cx + 16] = 1.0
    side = crop_side(rf, hw, [p], [c])
    assert side == (31, 31)
    x0, y0, x1, y1 = unit_box(rf, 0, 0, hw, side)
    assert (x1 - x0, y1 - y0) == (31, 31) and (x0 + x1 - 1) / 2 == pytest.approx(c[1], abs=0.5)
    assert crop_side(rf, hw) == hw  # nothing measured: the whole image
    tiny = np.zeros((3, 64, 64))
    tiny[0, cy, cx] = 1.0
    assert crop_side(rf, hw, [tiny], [c]) == (MIN_SIDE, MIN_SIDE)
    assert unit_box(ReceptiveField.whole(hw), -1, -1, hw, hw) == (0, 0, 64, 64)


def test_robust_stretch_saturates_outliers_and_keeps_zero_grey():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(3, 50, 50))
    a[0, 0, 0] = 1e6  # one extreme pixel
    out = robust_stretch(a)
    s = np.percentile(np.abs(a[a != 0]), 99.5)
    np.testing.assert_allclose(out, np.clip(0.5 + a / (2 * s), 0, 1))
    assert out.std() > 0.1  # not a grey tile
    z = np.zeros((3, 4, 4))
    z[:, 0, 0] = np.nan
    out = robust_stretch(z, background=0.9)
    assert out[0, 0, 0] == 0.9 and (out[:, 1:] == 0.5).all()
