"""The approximate mode (Krypton's adaptive drill-down and projective-field truncation) states
its error honestly: its SSIM is recomputed here with scikit-image against a naive exact loop, the
check blocks are exact even with truncation, a missed target is reported as such, and the
truncated executor equals an independent naive implementation of the same truncation."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from convlens_occlusion import OcclusionApproxWarning, OcclusionGrid, occlusion_maps
from convlens_occlusion._approx import SubGrid
from convlens_occlusion._compute import _input_geom, _input_patches
from convlens_occlusion._incremental import IncrementalOcclusion
from PIL import Image
from skimage.metrics import structural_similarity
from torch import nn
from typer.testing import CliRunner

from convlens.cli import build_app
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


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_ssim_is_recomputable_against_a_naive_loop(case, tau):
    model, x, t, exact = case
    with warnings.catch_warnings():  # a miss warns; the record says so (checked below)
        warnings.simplefilter("ignore", OcclusionApproxWarning)
        res = occlusion_maps(model, x, window=6, stride=1, target=t, approx=True, threads=1,
                             approx_truncate=tau, approx_precision="fp32")  # fmt: skip
    rec = res.path["approx"]["per_image"][0]
    assert rec["truncate"] == tau
    blocks = rec["check"]["blocks"]
    assert len(blocks) == round(0.1 * exact.size / 49)  # 10 % of 27 × 27 positions: 1 block
    # the figure: each predicted block against the naive loop's exact block; the worst counts
    figures = []
    for (r0, c0, r1, c1), predicted in zip(blocks, rec["check"]["predicted"], strict=True):
        figures.append(structural_similarity(np.asarray(predicted), exact[r0:r1, c0:c1],
                                             win_size=7, data_range=rec["check"]["data_range"]))  # fmt: skip
    assert rec["check"]["ssim"] == pytest.approx(min(figures), abs=1e-6)
    assert rec["meets_target"] == (min(figures) >= 0.9)
    assert 0 < rec["check"]["data_range"] <= 1.0
    # the check blocks are exact (the naive loop's values) even where truncation computed them
    ours = res.prob_target[0]
    for r0, c0, r1, c1 in blocks:
        assert np.abs(ours[r0:r1, c0:c1] - exact[r0:r1, c0:c1]).max() <= 1e-5 * exact.max()
    n_exact = int((np.abs(ours - exact) <= 1e-5 * exact.max()).sum())
    assert n_exact >= rec["exact_positions"]
    computed = rec["computed_positions"]
    assert computed["total"] < 0.7 * exact.size  # it really skipped work
    if tau == 1.0:
        assert rec["exact_positions"] == computed["total"]
        # the whole map, recomputed independently, is a close approximation of the exact one
        whole = structural_similarity(ours.astype(np.float64), exact, win_size=7,
                                      data_range=float(exact.max() - exact.min()))  # fmt: skip
        assert whole >= 0.9
    else:  # truncated positions are not exact: only the check blocks are
        assert rec["exact_positions"] < computed["total"]
        assert np.abs(ours - exact).max() > 1e-4 * exact.max()


def test_a_missed_target_is_reported_not_hidden(case):
    model, x, t, _ = case
    with pytest.warns(OcclusionApproxWarning, match="misses the target"):
        res = occlusion_maps(model, x, window=6, stride=1, target=t, approx=True,
                             approx_coarse=6, approx_drill=0.0, approx_ssim=0.999,
                             approx_truncate=1.0, threads=1, approx_precision="fp32")  # fmt: skip
    assert res.path["approx"]["meets_target"] is False
    assert res.path["approx"]["per_image"][0]["meets_target"] is False


def test_drilling_everywhere_is_exact(case):
    model, x, t, exact = case
    res = occlusion_maps(model, x, window=6, stride=1, target=t, approx=True, approx_drill=1.0,
                         approx_truncate=1.0, threads=1, approx_precision="fp32")  # fmt: skip
    assert np.abs(res.prob_target[0] - exact).max() <= 1e-5 * exact.max()
    assert res.path["approx"]["per_image"][0]["check"]["ssim"] == pytest.approx(1.0)


def test_bad_approx_settings_are_errors(case):
    model, x, _, _ = case
    with pytest.raises(ConvlensError, match="approx"):
        occlusion_maps(model, x, window=6, stride=2, approx=True, approx_coarse=1)


@pytest.mark.parametrize("tau", [0.0, -0.5, 1.5, float("nan"), "half"])
def test_bad_truncation_is_a_one_line_error(case, tau):
    model, x, _, _ = case
    with pytest.raises(ConvlensError, match="truncate") as err:
        occlusion_maps(model, x, window=6, stride=2, approx=True, approx_truncate=tau)
    assert "\n" not in str(err.value)


def occlusion_cli(tmp_path, *options: str):
    """``convlens probe occlusion --model zfnet_mini --approx OPTIONS`` on a random photo, into
    ``tmp_path / "out"``: the CliRunner result."""
    image = tmp_path / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(image)
    return CliRunner().invoke(build_app(), [
        "probe", "occlusion", "--model", "zfnet_mini", "--images", str(image), "--approx",
        *options, "--out", str(tmp_path / "out"),
    ])  # fmt: skip


def test_bad_truncation_exits_2_from_the_cli(tmp_path):
    res = occlusion_cli(tmp_path, "--approx-truncate", "1.5")
    lines = [ln for ln in res.output.splitlines() if ln.strip() and "warning:" not in ln
             and "RANDOM" not in ln]  # fmt: skip
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and "truncate" in lines[0], res.output
    assert "Traceback" not in res.output


# -- the truncated executor against an independent naive implementation -------------------------


class ResChain(nn.Module):
    """Convolutions (strided, padded), max pooling and a residual sum, as a list the naive
    reference walks: ``("op", module)`` or ``("res", [ops])`` for ``x + f(x)``."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.p = nn.MaxPool2d(3, 2, padding=1)
        self.r1 = nn.Conv2d(8, 8, 3, padding=1)
        self.r2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 5)
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for prm in self.parameters():
                prm.copy_(torch.randn(prm.shape, generator=g) / max(1, prm[0].numel()) ** 0.5)
        self.eval()

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        x = self.p(x)
        x = x + self.r2(torch.relu(self.r1(x)))
        x = torch.relu(self.c3(x))
        return self.fc(x.flatten(1))

    def spec(self):
        return [self.c1, torch.relu, self.c2, torch.relu, self.p,
                ("res", [self.r1, torch.relu, self.r2]), self.c3, torch.relu]  # fmt: skip


def _cap(tau: float, size: int) -> int:
    return max(1, math.ceil(tau * size - 1e-9))


def _window_box(lo, n, m, out, tau):
    """Krypton's changed rows after a window, then truncated: written from the paper, not from
    the executor (ceil/floor of the window's reach, a centred cap of ⌈τ·out⌉ units)."""
    k, s, p = m.kernel_size, m.stride, m.padding
    k, s, p = (k if isinstance(k, int) else k[0]), (s if isinstance(s, int) else s[0]), (
        p if isinstance(p, int) else p[0])  # fmt: skip
    first = max(0, math.ceil((lo + p - (k - 1)) / s))
    last = min(out - 1, (lo + n - 1 + p) // s)
    return _truncate(first, last - first + 1, out, tau)


def _truncate(lo, n, out, tau):
    cap = _cap(tau, out)
    if n <= cap:
        return lo, n
    return min(max(lo + (n - cap) // 2, 0), out - cap), cap


def _naive_truncated(model: ResChain, x, grid: OcclusionGrid, tau: float) -> torch.Tensor:
    """Per position: the painted image through the model one op at a time on full maps; after
    every window and residual sum, only the (truncated) changed box keeps its new values, the
    rest is the unoccluded image's map."""

    def walk(ops, v, clean, box):
        for op in ops:
            if isinstance(op, tuple):  # residual: x + f(x), the union of the two boxes
                branch, b_clean, b_box = walk(op[1], v, clean, box)
                out, out_clean = v + branch, clean + b_clean
                (ya, ha, xa, wa), (yb, hb, xb, wb) = box, b_box
                y0, x0 = min(ya, yb), min(xa, xb)
                y1, x1 = max(ya + ha, yb + hb), max(xa + wa, xb + wb)
                H, W = out.shape[-2:]
                box = (*_truncate(y0, y1 - y0, H, tau), *_truncate(x0, x1 - x0, W, tau))
            else:
                out, out_clean = op(v), op(clean)
                if isinstance(op, (nn.Conv2d, nn.MaxPool2d)):
                    H, W = out.shape[-2:]
                    box = (*_window_box(box[0], box[1], op, H, tau),
                           *_window_box(box[2], box[3], op, W, tau))  # fmt: skip
            y, h, x0, w = box
            kept = out_clean.clone()
            kept[..., y : y + h, x0 : x0 + w] = out[..., y : y + h, x0 : x0 + w]
            v, clean = kept, out_clean
        return v, clean, box

    rows = []
    k = grid.window
    for x0, y0, _, _ in grid.boxes():
        occluded = x.clone()
        occluded[..., y0 : y0 + k, x0 : x0 + k] = 0.0
        box = (min(y0, grid.height - k), k, min(x0, grid.width - k), k)
        v, _, _ = walk(model.spec(), occluded, x, box)
        rows.append(model.fc(v.flatten(1))[0])
    return torch.stack(rows)


def _engine_logits(model, x, grid, tau, index=None):
    engine = IncrementalOcclusion(model, None, truncate=tau, full_above=1.0)
    image = engine.cache(x)
    sub = grid if index is None else SubGrid(grid, index)
    geom = _input_geom(sub, x.device)
    plan = engine.plan(image, geom)
    patch = _input_patches(x[0], sub, geom, slice(0, len(sub)), torch.zeros(3, 1, 1))
    logits, _ = engine.run(image, plan, patch, slice(0, len(sub)), None)
    return logits.double(), plan, engine


@pytest.fixture(scope="module")
def reschain():
    model = ResChain()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    grid = OcclusionGrid(32, 32, 6, 2)
    with torch.inference_mode():
        exact, plan, _ = _engine_logits(model, x, grid, 1.0)
    return model, x, grid, exact, plan


@pytest.mark.parametrize("tau", [0.6, 0.4, 0.25])
def test_truncation_equals_a_naive_reference(reschain, tau):
    model, x, grid, exact, _ = reschain
    with torch.inference_mode():
        ours, plan, engine = _engine_logits(model, x, grid, tau)
        ref = _naive_truncated(model, x, grid, tau).double()
        # a position's value does not depend on the positions batched with it
        index = np.arange(3, len(grid), 7)
        sub, _, _ = _engine_logits(model, x, grid, tau, index)
    scale = float(ref.abs().max())
    assert float((ours - ref).abs().max()) <= 1e-5 * scale
    assert float((sub - ref[index]).abs().max()) <= 1e-5 * scale
    assert float((ours - exact).abs().max()) > 1e-4 * scale  # truncation changed the map
    # the truncated nodes' patches are ⌈τ·H⌉ × ⌈τ·W⌉ of their maps, and they stay on patches
    assert plan.truncated
    for n in plan.truncated:
        g = plan.geoms[n]
        assert g.h <= _cap(tau, g.H) and g.w <= _cap(tau, g.W)
        assert g.h == _cap(tau, g.H) or g.w == _cap(tau, g.W)
    assert all(r.mode == "patch" for r in plan.report)


def test_no_truncation_where_the_cap_is_never_reached(reschain):
    """At τ = 1 nothing is cut; at a τ whose cap exceeds every changed box, the truncated
    planner runs the same patches and gives the exact values."""
    model, x, grid, exact, plan_exact = reschain
    with torch.inference_mode():
        one, plan_one, _ = _engine_logits(model, x, grid, 1.0)
        high, plan_high, _ = _engine_logits(model, x, grid, 0.95)
    assert torch.equal(one, exact)
    assert not plan_one.truncated and not plan_high.truncated
    assert float((high - exact).abs().max()) <= 1e-6 * float(exact.abs().max())
    high_geoms = {n.name: g for n, g in plan_high.geoms.items()}  # engines trace their own graph
    assert len(high_geoms) == len(plan_exact.geoms)
    for n, g in plan_exact.geoms.items():  # same patch sizes as the exact plan
        assert (high_geoms[n.name].h, high_geoms[n.name].w) == (g.h, g.w)


def test_approx_engine_is_cached_by_truncation(case):
    from convlens_occlusion._cache import entry_for

    model, x, t, _ = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OcclusionApproxWarning)
        occlusion_maps(model, x, window=6, stride=2, target=t, approx=True, approx_truncate=0.5,
                       threads=1, approx_precision="fp32")  # fmt: skip
    entry, _ = entry_for(model, x)
    taus = sorted(k[-1] for k in entry.engines)
    assert 0.5 in taus and 1.0 in taus
