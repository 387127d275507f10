"""Approximate occlusion maps with a stated error: Krypton's adaptive drill-down.

Krypton (Nakandala, Kumar & Papakonstantinou, SIGMOD 2019, Section 4) first runs the occluder
at a coarse stride and then at the fine stride only where the map changes, and caps how far the
change may spread through the layers. Here, on the fine grid of the run (``--stride``):

1. **coarse**: every ``coarse``-th row and column of positions (and the last row and column) are
   computed, with **projective-field truncation** at τ = ``truncate`` on the incremental path
   (``_incremental.py``: at every convolution, pooling window, residual sum or concatenation a
   position's changed box is capped at ``⌈τ·H⌉`` × ``⌈τ·W⌉`` units of the ``H``×``W`` map,
   centred on the untruncated box and clamped inside the map; the rest reads the unoccluded
   image's values; τ = 1 is exact);
2. the rest of the map — every logit and the feature activity — is interpolated bilinearly between
   them;
3. **drill-down**: the cells of the coarse lattice whose four corners differ most in the target's
   probability are computed (truncated, as in 1), most-changing first, until ``drill`` of all
   positions have been added;
4. **the stated error**: blocks of 7 × 7 positions (smaller where the grid is), chosen at random
   (seeded; as many as cover about ``check`` of the positions, at least one), are predicted
   (interpolated, or computed with truncation) and then computed **exactly** (τ = 1, whatever
   ``truncate`` is), and the SSIM (scikit-image's ``structural_similarity``, 7 × 7 window or the
   largest odd one that fits, ``data_range`` the range of the target probabilities computed) of
   each predicted block against the exact one is measured; the worst block is the run's quality
   figure. A map whose figure is below ``target`` is reported as missing the target
   (``meets_target: false`` and a warning), never as a good approximation. The exact values of
   the blocks then replace the predicted ones.

Defaults (``COARSE``, ``DRILL``, ``CHECK``, ``TRUNCATE``) were chosen by measuring the whole map's
SSIM against the exact map (``docs/benchmarks.md``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ._grid import OcclusionGrid

__all__ = [
    "SubGrid",
    "approximate_image",
    "ssim",
    "COARSE",
    "DRILL",
    "DRILL_BF16",
    "CHECK",
    "TRUNCATE",
]

#: Defaults of ``--approx`` (measured: ``docs/benchmarks.md``).
COARSE = 2
DRILL = 0.3
#: The drill-down default where the positions run in bfloat16 (``_precision.py``): at a fifth
#: of float32's cost per position every position is computed, and the lattice only orders them.
DRILL_BF16 = 1.0
CHECK = 0.1
TRUNCATE = 0.75


@dataclass(frozen=True)
class SubGrid:
    """Some positions (``index``, row-major in ``grid``) of an :class:`OcclusionGrid`, with its
    interface (``starts``, ``boxes``, ``window``, ``height``, ``width``, ``len``)."""

    grid: OcclusionGrid
    index: np.ndarray

    @property
    def window(self) -> int:
        return self.grid.window

    @property
    def height(self) -> int:
        return self.grid.height

    @property
    def width(self) -> int:
        return self.grid.width

    def __len__(self) -> int:
        return len(self.index)

    def starts(self) -> tuple[np.ndarray, np.ndarray]:
        y0, x0 = self.grid.starts()
        return y0[self.index], x0[self.index]

    def boxes(self) -> np.ndarray:
        return self.grid.boxes()[self.index]


def _lattice(n: int, step: int) -> np.ndarray:
    return np.unique(np.r_[np.arange(0, n, step), n - 1])


def _interp_axis(values: torch.Tensor, at: np.ndarray, n: int, axis: int) -> torch.Tensor:
    """Linear interpolation along ``axis`` from the lattice rows ``at`` to all ``n`` rows."""
    full = torch.arange(n, dtype=torch.float64)
    pos = torch.as_tensor(at, dtype=torch.float64)
    hi = torch.searchsorted(pos, full, right=False).clamp(1, max(1, len(at) - 1))
    lo = hi - 1
    if len(at) == 1:
        return values.index_select(axis, torch.zeros(n, dtype=torch.long))
    w = ((full - pos[lo]) / (pos[hi] - pos[lo])).clamp(0, 1)
    shape = [1] * values.dim()
    shape[axis] = n
    w = w.view(shape)
    return values.index_select(axis, lo) * (1 - w) + values.index_select(axis, hi) * w


def ssim(a: np.ndarray, b: np.ndarray, data_range: float) -> float | None:
    """scikit-image's SSIM of two maps with a 7 × 7 window, or the largest odd one that fits
    (None below 3 × 3)."""
    from skimage.metrics import structural_similarity

    win = min(7, *a.shape)
    win -= 1 - win % 2
    if win < 3:
        return None
    return float(structural_similarity(a, b, win_size=win, data_range=data_range))


def approximate_image(
    grid: OcclusionGrid,
    exact: Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]],
    target: int,
    *,
    coarse: int,
    drill: float,
    quality: float,
    seed: int,
    check: float = CHECK,
    fast: Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]] | None = None,
    truncate: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Logits ``[P, K]`` (float32) and feature activity ``[P]`` (float64) over ``grid``:
    computed at the coarse and drill-down positions by ``fast(index) -> (logits, feature)``
    (projective-field truncation at τ = ``truncate``; ``exact`` itself when None), interpolated
    elsewhere, and exact (``exact(index)``, τ = 1) on the check blocks; and the record of the run
    (module docstring)."""
    rows, cols = grid.shape
    positions = rows * cols
    fast = fast or exact
    truncated = fast is not exact
    done = np.zeros(positions, dtype=bool)  # computed (truncated or exact)
    is_exact = np.zeros(positions, dtype=bool)  # computed exactly
    logits: torch.Tensor | None = None
    feature = torch.zeros(positions, dtype=torch.float64)
    seconds = {"coarse": 0.0, "drill": 0.0, "check": 0.0}

    def compute(index: np.ndarray, exactly: bool, stage: str) -> int:
        nonlocal logits
        index = index[~(is_exact if exactly else done)[index]]
        if not len(index):
            return 0
        t0 = time.perf_counter()
        lg, ft = (exact if exactly else fast)(index)
        seconds[stage] += time.perf_counter() - t0
        if logits is None:
            logits = torch.zeros((positions, lg.shape[1]), dtype=torch.float64)
        logits[index] = lg.double()
        feature[index] = ft.double()
        done[index] = True
        is_exact[index] |= exactly or not truncated
        return len(index)

    # 1. the coarse lattice
    ry, rx = _lattice(rows, coarse), _lattice(cols, coarse)
    lattice = (ry[:, None] * cols + rx[None, :]).reshape(-1)
    n_coarse = compute(lattice, False, "coarse")
    # 2. interpolate everything between lattice points
    grid_l = logits.view(rows, cols, -1)[ry][:, rx]
    grid_f = feature.view(rows, cols)[ry][:, rx]
    pred_l = _interp_axis(_interp_axis(grid_l, ry, rows, 0), rx, cols, 1).reshape(positions, -1)
    pred_f = _interp_axis(_interp_axis(grid_f, ry, rows, 0), rx, cols, 1).reshape(positions)
    lattice_mask = torch.as_tensor(done.copy())
    logits = torch.where(lattice_mask[:, None], logits, pred_l)
    feature = torch.where(lattice_mask, feature, pred_f)
    # 3. drill down where the target's probability changes most across a coarse cell
    prob_l = grid_l.softmax(-1)[..., target].numpy()
    cells = []
    for a in range(len(ry) - 1):
        for b in range(len(rx) - 1):
            corners = prob_l[a : a + 2, b : b + 2]
            cells.append((float(corners.max() - corners.min()), a, b))
    cells.sort(key=lambda c: -c[0])
    budget = int(round(drill * positions))
    chosen: dict[int, None] = {}  # ordered: most-changing cells first
    for _, a, b in cells:
        if len(chosen) >= budget:
            break
        r = np.arange(ry[a], ry[a + 1] + 1)
        c = np.arange(rx[b], rx[b + 1] + 1)
        for i in (r[:, None] * cols + c[None, :]).reshape(-1):
            if not done[i]:
                chosen[int(i)] = None
    n_drill = compute(np.asarray(list(chosen)[:budget], dtype=np.int64), False, "drill")
    # 4. the stated error: random blocks, predicted first (interpolated, or computed with
    # truncation), then computed exactly (τ = 1)
    rng = np.random.default_rng(seed)
    bh, bw = min(rows, 7), min(cols, 7)
    n_blocks = max(1, int(round(check * positions / (bh * bw))))
    blocks, predicted = [], []
    for _ in range(n_blocks):
        r0 = int(rng.integers(0, rows - bh + 1))
        c0 = int(rng.integers(0, cols - bw + 1))
        idx = np.arange(r0, r0 + bh)[:, None] * cols + np.arange(c0, c0 + bw)[None, :]
        blocks.append(([r0, c0, r0 + bh, c0 + bw], idx.reshape(-1)))
        predicted.append(logits[idx.reshape(-1)].softmax(-1)[:, target].numpy().reshape(bh, bw))
    n_check = compute(np.unique(np.concatenate([b[1] for b in blocks])), True, "check")
    seen = logits[torch.as_tensor(done)].softmax(-1)[:, target].numpy()
    data_range = float(seen.max() - seen.min()) or 1.0
    figures = []
    for (_, idx), pred in zip(blocks, predicted, strict=True):
        truth = logits[idx].softmax(-1)[:, target].numpy().reshape(bh, bw)
        figures.append(ssim(pred, truth, data_range))
    # the worst block is the run's figure: a map is called good only where every block is
    figure = None if any(f is None for f in figures) else min(figures)
    meets = figure is not None and figure >= quality
    record = {
        "method": "adaptive drill-down (Krypton SIGMOD 2019, Sec. 4.2)"
        + (
            f" with projective-field truncation, tau {truncate:g} (Sec. 4.1)"
            if truncated and truncate < 1.0
            else ""
        ),
        "coarse": coarse,
        "drill": drill,
        "truncate": float(truncate) if truncated else 1.0,
        "target_ssim": quality,
        "seed": seed,
        "positions": positions,
        "computed_positions": {
            "coarse": n_coarse,
            "drill": n_drill,
            "check": n_check,
            "total": int(done.sum()),
        },
        "exact_positions": int(is_exact.sum()),
        "seconds": {k: round(v, 4) for k, v in seconds.items()},
        "check": {
            "blocks": [b[0] for b in blocks],
            "map": "prob_target",
            "data_range": data_range,
            "predicted": [p.tolist() for p in predicted],
            "ssim_blocks": figures,
            "ssim": figure,
        },
        "meets_target": bool(meets),
    }
    return logits.float(), feature, record
