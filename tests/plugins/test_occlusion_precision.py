"""``--approx`` in bfloat16 (``_precision.py``): the coarse and drill-down positions run on a
bfloat16 copy of the model with its error on the unoccluded image subtracted; the check blocks
stay float32 and exact. References: a naive float32 loop, and a naive loop over the same
bfloat16 copy of the model with the same correction applied by hand."""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest
import torch
from convlens_occlusion import OcclusionApproxWarning, occlusion_maps
from convlens_occlusion._approx import DRILL, DRILL_BF16
from convlens_occlusion._cache import clear

import convlens.engine.precision as core_precision
from convlens.errors import ConvlensError
from convlens.testing import tiny_model
from tests.plugins.test_occlusion_approx import occlusion_cli
from tests.plugins.test_occlusion_exact import naive


def _run(model, x, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OcclusionApproxWarning)
        return occlusion_maps(model, x, window=6, stride=2, approx=True, threads=1,
                              return_logits=True, **kw)  # fmt: skip


@pytest.mark.parametrize("kind", ["functional", "resnet"])
def test_bf16_positions_match_a_naive_bf16_loop_and_the_checks_stay_exact(kind):
    model, shape = tiny_model(kind)
    x = torch.randn(1, *shape[1:], generator=torch.Generator().manual_seed(3))
    res = _run(model, x, approx_precision="bf16", approx_drill=1.0, approx_truncate=1.0)
    rec = res.path["approx"]["per_image"][0]
    assert rec["precision"]["format"] == "bf16" and rec["precision"]["bias_correction"]
    grid, layer, c = res.grid, res.layer, int(res.channels[0])
    exact, _ = naive(model, x, grid, 0.0, layer, c)  # float32, every position
    low = core_precision.low_precision_copy(model, torch.bfloat16)
    low_logits, _ = naive(low, x.to(torch.bfloat16), grid, 0.0, layer, c)
    with torch.no_grad():
        shift = model(x).float() - low(x.to(torch.bfloat16)).float()
    by_hand = low_logits.float() + shift  # the documented correction, applied independently
    ours = torch.as_tensor(res.logits[0]).reshape(len(grid), -1).float()
    checked = np.zeros(grid.shape, dtype=bool)
    for r0, c0, r1, c1 in rec["check"]["blocks"]:
        checked[r0:r1, c0:c1] = True
    checked = torch.as_tensor(checked.reshape(-1))
    scale = float(exact.abs().max())
    # the check blocks: float32 and exact, equal to the naive float32 loop
    assert float((ours[checked] - exact[checked]).abs().max()) <= 1e-5 * scale
    # elsewhere: the bfloat16 copy's values, corrected, as the independent bf16 loop gives them
    rest = ~checked
    err_ours = float((ours[rest] - exact[rest]).abs().max())
    err_ref = float((by_hand[rest] - exact[rest]).abs().max())
    assert err_ours > 1e-6 * scale  # really computed in bfloat16
    assert err_ours <= 2 * err_ref + 1e-3 * scale
    assert float((ours[rest] - by_hand[rest]).abs().max()) <= 2 * err_ref + 1e-3 * scale
    assert next(model.parameters()).dtype == torch.float32  # the model itself is untouched


def test_the_bias_correction_removes_the_copys_error_where_nothing_changes():
    # a constant image equal to the fill: every occluded image is the unoccluded one, so the
    # exact map is flat and any difference left is the copy's position-dependent rounding
    model, shape = tiny_model("resnet")
    x = torch.zeros(1, *shape[1:])
    res = _run(model, x, approx_precision="bf16", approx_drill=1.0, approx_truncate=1.0)
    with torch.no_grad():
        clean = model(x).float()[0]
        low_clean = core_precision.low_precision_copy(model, torch.bfloat16)(
            x.to(torch.bfloat16)
        ).float()[0]
    raw = float((low_clean - clean).abs().max())
    assert raw > 0  # bfloat16 does shift these logits
    ours = torch.as_tensor(res.logits[0]).reshape(-1, clean.numel()).float()
    assert float((ours - clean).abs().max()) <= 0.1 * raw


def test_auto_uses_bf16_only_where_the_hardware_has_it(monkeypatch):
    model, shape = tiny_model("resnet")
    x = torch.randn(1, *shape[1:], generator=torch.Generator().manual_seed(4))
    monkeypatch.setattr(core_precision, "native_bf16", lambda device: False)
    full = _run(model, x).path["approx"]["per_image"][0]
    rec = full["precision"]
    assert rec["format"] == "fp32" and "no native bfloat16" in rec["reason"]
    assert full["drill"] == DRILL  # float32 positions are dear: drill where the map changes
    monkeypatch.setattr(core_precision, "native_bf16", lambda device: True)
    full = _run(model, x).path["approx"]["per_image"][0]
    rec = full["precision"]
    assert rec["format"] == "bf16" and rec["requested"] == "auto"
    assert full["drill"] == DRILL_BF16 == 1.0  # bfloat16 positions are cheap: all of them
    assert full["computed_positions"]["total"] == full["positions"]
    rec = _run(model, x, approx_precision="fp32").path["approx"]["per_image"][0]["precision"]
    assert rec["format"] == "fp32" and rec["reason"] is None


def test_the_copy_is_made_once_per_model_and_a_model_that_cannot_be_copied_stays_fp32(
    monkeypatch,
):
    model, shape = tiny_model("functional")
    x = torch.randn(1, *shape[1:], generator=torch.Generator().manual_seed(5))
    clear(model)
    copies = []
    deepcopy = core_precision.copy.deepcopy

    def counted(*args, **kwargs):
        copies.append(deepcopy(*args, **kwargs))
        return copies[-1]

    monkeypatch.setattr(core_precision.copy, "deepcopy", counted)
    _run(model, x, approx_precision="bf16")
    _run(model, x, approx_precision="bf16")
    assert len(copies) == 1  # the second call (and choose_rule) reuse the copy
    assert core_precision.low_precision_copy(model) is copies[0]
    monkeypatch.undo()

    odd, _ = tiny_model("functional")
    odd.lock = threading.Lock()  # deepcopy refuses it
    res = _run(odd, x, approx_precision="bf16", approx_truncate=1.0, approx_drill=1.0)
    rec = res.path["approx"]["per_image"][0]
    assert rec["precision"]["format"] == "fp32"
    assert "cannot be copied" in rec["precision"]["reason"]
    exact, _ = naive(odd, x, res.grid, 0.0, res.layer, int(res.channels[0]))
    ours = torch.as_tensor(res.logits[0]).reshape(len(res.grid), -1).float()
    assert float((ours - exact).abs().max()) <= 1e-5 * float(exact.abs().max())


def test_a_bad_precision_is_a_one_line_error(tmp_path):
    model, shape = tiny_model("chain")
    x = torch.randn(1, *shape[1:])
    with pytest.raises(ConvlensError, match="precision 'fp64'"):
        occlusion_maps(model, x, window=6, stride=2, approx=True, approx_precision="fp64")
    res = occlusion_cli(tmp_path, "--approx-precision", "fp64")
    assert res.exit_code == 2, res.output
    assert "--approx-precision" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "out").exists()


def test_a_model_with_an_op_lacking_bf16_stays_fp32_and_exact():
    # the tiny chain has local response normalisation, whose CPU kernel (avg_pool3d) has no
    # bfloat16 version: the probe pass finds it before the sweep
    model, shape = tiny_model("chain")
    x = torch.randn(1, *shape[1:], generator=torch.Generator().manual_seed(6))
    res = _run(model, x, approx_precision="bf16", approx_truncate=1.0, approx_drill=1.0)
    rec = res.path["approx"]["per_image"][0]["precision"]
    assert rec["format"] == "fp32" and "no bf16 kernel" in rec["reason"]
    exact, _ = naive(model, x, res.grid, 0.0, res.layer, int(res.channels[0]))
    ours = torch.as_tensor(res.logits[0]).reshape(len(res.grid), -1).float()
    assert float((ours - exact).abs().max()) <= 1e-5 * float(exact.abs().max())


@pytest.mark.parametrize("meets", [True, False])
def test_the_figure_says_the_map_is_approximate_and_flags_a_miss_in_red(meets):
    from convlens_occlusion import OcclusionGrid
    from convlens_occlusion._render import figure

    grid = OcclusionGrid(32, 32, 8, 4)
    rng = np.random.default_rng(0)
    prob = rng.random(grid.shape)
    args = (rng.random((32, 32, 3)), grid, prob, rng.random(grid.shape),
            np.zeros(grid.shape, dtype=int), ["cup", "saucer"], 0, "conv5", 3, (0.5, 0.5, 0.5),
            None, "photo.png")  # fmt: skip
    rec = {"check": {"ssim": 0.93}, "meets_target": meets, "target_ssim": 0.9,
           "precision": {"format": "bf16"}}  # fmt: skip
    plain, marked = figure(*args), figure(*args, approx=rec)
    band = slice(0, 30)  # the titles, above the tiles
    red = (marked[band, :, 0] > 0.6) & (marked[band, :, 1] < 0.2) & (marked[band, :, 2] < 0.2)
    assert bool(red.any()) is (not meets)
    assert np.abs(plain[band] - marked[band]).max() > 0.5  # the titles changed


def test_the_report_says_the_maps_are_approximate_and_red_when_below_target(tmp_path):
    res = occlusion_cli(tmp_path, "--approx-ssim", "1.0")
    assert res.exit_code == 0, res.output
    html = (tmp_path / "out" / "index.html").read_text(encoding="utf-8")
    assert '<p style="color:#b00000">The maps are <b>approximate' in html
    assert "BELOW the target" in html
