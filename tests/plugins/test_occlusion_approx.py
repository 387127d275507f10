"""The approximate mode (Krypton's adaptive drill-down) states its error honestly: its SSIM is
recomputed here with scikit-image against a naive exact loop, the positions it computes exactly
are exact, and a missed target is reported as such."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from convlens_occlusion import OcclusionApproxWarning, occlusion_maps
from skimage.metrics import structural_similarity

from convlens.errors import ConvlensError
from convlens.testing import tiny_model
from tests.plugins.test_occlusion_exact import naive


@pytest.fixture(scope="module")
def case():
    model, shape = tiny_model("chain")
    x = torch.randn(1, *shape[1:], generator=torch.Generator().manual_seed(1))
    ref = occlusion_maps(model, x, window=6, stride=1, threads=1)  # for the grid and target
    logits, _ = naive(model, x, ref.grid, 0.0, ref.layer, int(ref.channels[0]))
    t = int(ref.targets[0])
    exact = logits.softmax(1)[:, t].numpy().reshape(ref.grid.shape)
    return model, x, t, exact


def test_ssim_is_recomputable_against_a_naive_loop(case):
    model, x, t, exact = case
    res = occlusion_maps(model, x, window=6, stride=1, target=t, approx=True, threads=1)
    rec = res.path["approx"]["per_image"][0]
    blocks = rec["check"]["blocks"]
    assert len(blocks) == round(0.15 * exact.size / 49)  # 15 % of 27 × 27 positions: 2 blocks
    # the figure: each predicted block against the naive loop's exact block; the worst counts
    figures = []
    for (r0, c0, r1, c1), predicted in zip(blocks, rec["check"]["predicted"], strict=True):
        figures.append(structural_similarity(np.asarray(predicted), exact[r0:r1, c0:c1],
                                             win_size=7, data_range=rec["check"]["data_range"]))  # fmt: skip
    assert rec["check"]["ssim"] == pytest.approx(min(figures), abs=1e-6)
    assert 0 < rec["check"]["data_range"] <= exact.max() - exact.min() + 1e-9
    # the map: exact (naive) wherever it was computed, the check blocks included
    ours = res.prob_target[0]
    for r0, c0, r1, c1 in blocks:
        assert np.abs(ours[r0:r1, c0:c1] - exact[r0:r1, c0:c1]).max() <= 1e-5 * exact.max()
    n_exact = int((np.abs(ours - exact) <= 1e-5 * exact.max()).sum())
    assert n_exact >= rec["exact_positions"]["total"]
    assert rec["exact_positions"]["total"] < 0.7 * exact.size  # it really skipped work
    # the whole map, recomputed independently, is a close approximation of the exact one
    whole = structural_similarity(ours.astype(np.float64), exact, win_size=7,
                                  data_range=float(exact.max() - exact.min()))  # fmt: skip
    assert whole >= 0.9


def test_a_missed_target_is_reported_not_hidden(case):
    model, x, t, _ = case
    with pytest.warns(OcclusionApproxWarning, match="misses the target"):
        res = occlusion_maps(model, x, window=6, stride=1, target=t, approx=True,
                             approx_coarse=6, approx_drill=0.0, approx_ssim=0.999,
                             threads=1)  # fmt: skip
    assert res.path["approx"]["meets_target"] is False
    assert res.path["approx"]["per_image"][0]["meets_target"] is False


def test_drilling_everywhere_is_exact(case):
    model, x, t, exact = case
    res = occlusion_maps(model, x, window=6, stride=1, target=t, approx=True, approx_drill=1.0,
                         threads=1)  # fmt: skip
    assert np.abs(res.prob_target[0] - exact).max() <= 1e-5 * exact.max()
    assert res.path["approx"]["per_image"][0]["check"]["ssim"] == pytest.approx(1.0)


def test_bad_approx_settings_are_errors(case):
    model, x, _, _ = case
    with pytest.raises(ConvlensError, match="approx"):
        occlusion_maps(model, x, window=6, stride=2, approx=True, approx_coarse=1)
