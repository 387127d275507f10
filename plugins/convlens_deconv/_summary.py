"""Running summaries of every unit's activations, kept beside the top-k while mining (the atlas).

Two small objects with ``update`` / ``merge`` / ``state_dict`` (the distributed merge and the
resume checkpoint reuse ``merge`` and ``state_dict``, so single-process, multi-rank and resumed
runs agree by construction):

:class:`HistogramSketch` — a quantile sketch of fixed size per unit
    A histogram of ``bins`` (default 512) counts per unit on a **power-of-two grid with an
    adaptive range**: bin ``j`` of a unit holds values in ``[(k0 + j)·w, (k0 + j + 1)·w)`` with
    ``w = 2**e``; ``e`` is the smallest integer for which every value seen so far fits in
    ``bins`` bins (``k0 = floor(min / w)``). When a value falls outside, ``e`` grows and pairs of
    bins are added together — exactly, because the grids are nested — so the counts never depend
    on the order in which values arrived or on how they were split across ranks: a merged, a
    resumed and a one-pass sketch are identical. Memory: ``bins`` int64 counts per unit.

    **Error.** :meth:`HistogramSketch.quantile` returns a value in the same bin as the exact
    quantile ``numpy.quantile(values, q, method="inverted_cdf")`` (linear within the bin, clamped
    to the exact min and max), so its error is below one bin width ``w``; and ``w < 4·(max −
    min)/(bins − 1)``, i.e. under 0.8 % of the unit's range for 512 bins.

:class:`UnitSummary` — one layer's units over a stream of images
    ``mean``: mean activation over every position of every image (float64 sums of float32
    per-image sums); ``rate``: fraction of positions with activation > 0 (the unit's activation
    rate); ``max_mean``: mean over images of the unit's strongest activation in each image; and
    the sketch of that per-image maximum — the quantity the top-k ranks, so a unit page can show
    where its top-9 lie against a typical image (quantiles :data:`QUANTILES`). Non-finite values
    are left out of the sketch and the sums.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["HistogramSketch", "UnitSummary", "QUANTILES", "BINS"]

#: Bins per unit of the quantile sketch.
BINS = 512
#: The quantiles of the per-image maximum written for every unit.
QUANTILES = (0.1, 0.5, 0.9, 0.99)
_MIN_EXP = -60  # the finest grid (a unit whose values are all equal sits in one narrow bin)
_RESOLUTION_BITS = 40  # bins no finer than 2^-40 of the largest magnitude: indices < 2^41


def _fit_exponent(lo: torch.Tensor, hi: torch.Tensor, bins: int) -> torch.Tensor:
    """Per unit, the smallest ``e`` with ``floor(hi/2^e) - floor(lo/2^e) < bins`` — but at least
    ``log2(max(|lo|, |hi|)) - RESOLUTION_BITS`` (bin indices stay exact in float64), and at least
    ``_MIN_EXP``. A monotone function of the range: a wider range never gets a finer grid."""
    span = (hi - lo).clamp(min=0)
    e = torch.ceil(torch.log2((span / (bins - 1)).clamp(min=2.0**_MIN_EXP)))
    mag = torch.maximum(lo.abs(), hi.abs()).clamp(min=2.0**_MIN_EXP)
    e = torch.maximum(e, torch.ceil(torch.log2(mag)) - _RESOLUTION_BITS)
    e = e.clamp(min=_MIN_EXP).to(torch.int64)
    for _ in range(4):  # alignment may need one more doubling
        w = torch.pow(2.0, e.double())
        bad = (torch.floor(hi / w) - torch.floor(lo / w)) >= bins
        if not bool(bad.any()):
            break
        e = e + bad.to(torch.int64)
    return e


class HistogramSketch:
    """Per-unit fixed-bin histograms on nested power-of-two grids (module docstring)."""

    def __init__(self, units: int, bins: int = BINS) -> None:
        self.units, self.bins = int(units), int(bins)
        self.counts = torch.zeros(self.units, self.bins, dtype=torch.int64)
        self.exp = torch.full((self.units,), _MIN_EXP, dtype=torch.int64)
        self.k0 = torch.zeros(self.units, dtype=torch.int64)
        self.lo = torch.full((self.units,), math.inf, dtype=torch.float64)
        self.hi = torch.full((self.units,), -math.inf, dtype=torch.float64)

    @property
    def n(self) -> torch.Tensor:
        return self.counts.sum(1)

    def _regrid(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Move every unit to the grid that fits ``[lo, hi]`` (which contains the old range);
        nested grids: the counts are summed exactly."""
        empty = ~torch.isfinite(self.lo)
        old = torch.where(empty, _MIN_EXP, self.exp)
        e_new = torch.maximum(_fit_exponent(lo, hi, self.bins), old)
        k0_new = torch.floor(lo / torch.pow(2.0, e_new.double())).to(torch.int64)
        if bool(((e_new == self.exp) & (k0_new == self.k0)).all()):
            return
        scale = torch.pow(2.0, (e_new - self.exp).double())[:, None]  # >= 1: exact in float64
        absolute = (self.k0[:, None] + torch.arange(self.bins)[None, :]).double()
        j = torch.floor(absolute / scale) - k0_new[:, None].double()
        j = j.clamp(0, self.bins - 1).to(torch.int64)  # only empty bins can fall outside
        new = torch.zeros_like(self.counts)
        new.scatter_add_(1, j, self.counts)
        self.counts, self.exp, self.k0 = new, e_new, k0_new

    def update(self, values: torch.Tensor) -> None:
        """Add ``values`` ``[N, units]`` (one row per image)."""
        v = values.detach().to(torch.float64).cpu()
        finite = torch.isfinite(v)
        if not bool(finite.any()):
            return
        lo = torch.where(finite, v, math.inf).amin(0)
        hi = torch.where(finite, v, -math.inf).amax(0)
        lo, hi = torch.minimum(lo, self.lo), torch.maximum(hi, self.hi)
        seen = torch.isfinite(lo)
        self._regrid(torch.where(seen, lo, 0.0), torch.where(seen, hi, 0.0))
        self.lo, self.hi = lo, hi
        w = torch.pow(2.0, self.exp.double())[None, :]
        j = (torch.floor(v / w) - self.k0[None, :].double()).clamp(0, self.bins - 1).to(torch.int64)
        self.counts.scatter_add_(1, j.T.contiguous(), finite.T.to(torch.int64).contiguous())

    def merge(self, other: HistogramSketch) -> HistogramSketch:
        """Add ``other``'s counts (same units and bins) into this sketch; returns self."""
        if (other.units, other.bins) != (self.units, self.bins):
            raise ValueError("sketches of different shapes cannot be merged")
        lo, hi = torch.minimum(self.lo, other.lo), torch.maximum(self.hi, other.hi)
        seen = torch.isfinite(lo)
        lo0, hi0 = torch.where(seen, lo, 0.0), torch.where(seen, hi, 0.0)
        self._regrid(lo0, hi0)
        o = HistogramSketch(self.units, self.bins)
        o.load_state_dict(other.state_dict())
        o._regrid(lo0, hi0)
        # both now sit on the grid of [lo, hi]: each exponent was the fit of its own range, which
        # the merged range contains, so both moved to the merged range's fit and the same k0
        assert torch.equal(self.exp, o.exp) and torch.equal(self.k0, o.k0)
        self.counts = self.counts + o.counts
        self.lo, self.hi = lo, hi
        return self

    def quantile(self, q: float) -> torch.Tensor:
        """The ``q`` quantile of every unit (NaN for a unit with no value); module docstring."""
        n = self.n
        out = torch.full((self.units,), math.nan, dtype=torch.float64)
        cum = self.counts.cumsum(1)
        w = torch.pow(2.0, self.exp.double())
        for u in range(self.units):
            total = int(n[u])
            if total == 0:
                continue
            target = max(1, math.ceil(q * total))  # inverted_cdf: the target-th smallest value
            j = int(torch.searchsorted(cum[u], torch.tensor(target, dtype=torch.int64)))
            before = int(cum[u, j - 1]) if j > 0 else 0
            inside = int(self.counts[u, j])
            frac = (target - before - 0.5) / max(inside, 1)
            est = (float(self.k0[u]) + j + frac) * float(w[u])
            out[u] = min(max(est, float(self.lo[u])), float(self.hi[u]))
        return out

    def bin_width(self) -> torch.Tensor:
        return torch.pow(2.0, self.exp.double())

    def state_dict(self) -> dict[str, Any]:
        return {"counts": self.counts.clone(), "exp": self.exp.clone(), "k0": self.k0.clone(),
                "lo": self.lo.clone(), "hi": self.hi.clone(), "bins": self.bins}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts, self.exp, self.k0 = (
            state["counts"].clone(),
            state["exp"].clone(),
            state["k0"].clone(),
        )
        self.lo, self.hi = state["lo"].clone(), state["hi"].clone()
        self.units, self.bins = int(self.counts.shape[0]), int(state["bins"])


class UnitSummary:
    """Running mean, activation rate, per-image-maximum mean and sketch of ``units`` units
    (module docstring). ``update(act)`` takes the layer's output restricted to the units,
    ``[B, units, H, W]`` or ``[B, units]``."""

    def __init__(self, units: int, bins: int = BINS) -> None:
        self.units = int(units)
        self.images = 0
        self.positions = 0
        self.sum = torch.zeros(self.units, dtype=torch.float64)
        self.count = torch.zeros(self.units, dtype=torch.int64)  # finite positions
        self.positive = torch.zeros(self.units, dtype=torch.int64)
        self.max_sum = torch.zeros(self.units, dtype=torch.float64)
        self.sketch = HistogramSketch(self.units, bins)

    def update(self, act: torch.Tensor, maxes: torch.Tensor | None = None) -> None:
        """Add a batch ``act`` (``[B, units, H, W]`` or ``[B, units]``); ``maxes`` ``[B, units]``:
        each image's strongest activation per unit when the caller has it already (the top-k
        candidates), saving a pass over the maps."""
        a = act.detach()
        if a.dim() == 2:
            a = a[:, :, None, None]
        a = a.float().flatten(2)  # [B, C, P]
        sums = a.sum(2)  # finite exactly when every value is: the fast path
        if bool(torch.isfinite(sums).all()):
            count = torch.full((a.shape[1],), a.shape[0] * a.shape[2], dtype=torch.int64)
            m = a.amax(2) if maxes is None else maxes.to(a.device, torch.float32)
        else:
            finite = torch.isfinite(a)
            a = torch.where(finite, a, torch.zeros((), dtype=a.dtype, device=a.device))
            sums = a.sum(2)
            count = finite.sum(2).sum(0).cpu().to(torch.int64)
            m = torch.where(finite, a, -math.inf).amax(2)
        self.sum += sums.double().sum(0).cpu()
        self.count += count
        self.positive += (a > 0).sum(2).sum(0).cpu().to(torch.int64)
        mf = torch.where(torch.isfinite(m), m, 0.0)
        self.max_sum += mf.double().sum(0).cpu()
        self.sketch.update(m)
        self.images += int(a.shape[0])
        self.positions = int(a.shape[2])

    def merge(self, other: UnitSummary) -> UnitSummary:
        self.sum += other.sum
        self.count += other.count
        self.positive += other.positive
        self.max_sum += other.max_sum
        self.images += other.images
        self.positions = max(self.positions, other.positions)
        self.sketch.merge(other.sketch)
        return self

    def result(self, quantiles: Sequence[float] = QUANTILES) -> list[dict[str, Any]]:
        """One dict per unit: ``mean``, ``rate``, ``max_mean``, ``max_min``, ``max_max``,
        ``quantiles`` (of the per-image maximum, ``{"0.5": v, …}``), ``images``, ``positions``,
        ``sketch_bin_width`` (the quantiles' error bound)."""
        qs = {q: self.sketch.quantile(q) for q in quantiles}
        count = self.count.clamp(min=1).double()
        mean = self.sum / count
        rate = self.positive.double() / count
        nmax = self.sketch.n.clamp(min=1).double()
        max_mean = self.max_sum / nmax
        width = self.sketch.bin_width()
        out = []
        for u in range(self.units):
            out.append(
                {
                    "mean": _r(mean[u]),
                    "rate": _r(rate[u]),
                    "max_mean": _r(max_mean[u]),
                    "max_min": _r(self.sketch.lo[u]),
                    "max_max": _r(self.sketch.hi[u]),
                    "quantiles": {f"{q:g}": _r(qs[q][u]) for q in quantiles},
                    "sketch_bin_width": _r(width[u]),
                    "images": int(self.sketch.n[u]),
                    "positions": self.positions,
                }
            )
        return out

    def histogram(self, u: int, bins: int = 32) -> tuple[list[int], float, float]:
        """Unit ``u``'s sketch coarsened to at most ``bins`` bars: ``(counts, left, width)``."""
        s = self.sketch
        c = s.counts[u]
        nz = torch.nonzero(c).flatten()
        if len(nz) == 0:
            return [], 0.0, 0.0
        a, b = int(nz[0]), int(nz[-1]) + 1
        group = max(1, math.ceil((b - a) / bins))
        bars = [int(c[i : i + group].sum()) for i in range(a, b, group)]
        w = float(s.bin_width()[u])
        return bars, (float(s.k0[u]) + a) * w, group * w

    def state_dict(self) -> dict[str, Any]:
        return {"images": self.images, "positions": self.positions, "sum": self.sum.clone(),
                "count": self.count.clone(), "positive": self.positive.clone(),
                "max_sum": self.max_sum.clone(), "sketch": self.sketch.state_dict()}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.images, self.positions = int(state["images"]), int(state["positions"])
        self.sum, self.count = state["sum"].clone(), state["count"].clone()
        self.positive, self.max_sum = state["positive"].clone(), state["max_sum"].clone()
        self.sketch.load_state_dict(state["sketch"])
        self.units = int(self.sum.shape[0])


def _r(v: Any) -> float | None:
    """A float for JSON: 7 significant digits (float32 activations carry no more), None for
    NaN / infinity."""
    f = float(v)
    if not math.isfinite(f):
        return None
    return float(f"{f:.7g}")
