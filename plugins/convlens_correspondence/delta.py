"""The consistency score of Section 4.3 (Table 1), and the masks it is measured with.

For images ``i = 1..N`` and a layer ``l``, ``eps_i = x_i - x~_i`` is the change of the layer's
feature vector when a part is masked. Zeiler & Fergus score the consistency of these changes as

    Delta_l = sum_{i != j} H(sign(eps_i), sign(eps_j))

with ``H`` the Hamming distance (the number of positions where the two sign vectors differ;
``sign(0) = 0`` is a value of its own, so ``0`` vs ``+1`` counts as a difference). Table 1 reports
it normalised; convlens's normalisation is the *fraction of differing signs averaged over the
ordered pairs*::

    Delta_l / (N (N - 1) D)        D = the layer's number of units

so 0 means every image's features changed in the same direction and 0.5 is what independent
random signs would give.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from convlens.errors import ConvlensError

__all__ = [
    "sign_hamming",
    "delta",
    "Box",
    "map_box",
    "apply_masks",
    "random_box",
    "jitter_box",
]

#: ``(x0, y0, x1, y1)``: pixel edges, ``x1``/``y1`` exclusive (a box on pixels 3..5 is 3, 6).
Box = tuple[int, int, int, int]


def sign_hamming(eps: torch.Tensor) -> torch.Tensor:
    """Pairwise Hamming distances between the signs of the rows of ``eps`` ``[N, D]``:
    ``[N, N]`` int64, ``H[i, j] = #{k : sign(eps[i, k]) != sign(eps[j, k])}``.

    Computed as ``D - (agreements)`` with one indicator matrix per sign value (-1, 0, +1), so it
    costs three ``N x D x N`` products instead of an ``N x N x D`` comparison tensor.
    """
    if eps.dim() != 2:
        raise ConvlensError(f"sign_hamming: expected [N, D] differences, got {list(eps.shape)}")
    s = torch.sign(eps)
    d = s.shape[1]
    agree = torch.zeros(s.shape[0], s.shape[0], dtype=torch.float64, device=s.device)
    for v in (-1.0, 0.0, 1.0):
        ind = (s == v).to(torch.float64)
        agree += ind @ ind.T
    # float64 sums of 0/1 products are exact up to 2**53 units
    return (d - agree.round()).to(torch.int64).cpu()


def delta(eps: torch.Tensor) -> dict[str, object]:
    """Section 4.3's ``Delta`` of the differences ``eps`` ``[N, D]`` (N >= 2).

    Returns ``raw`` (the paper's sum over ordered pairs i != j), ``value`` (raw / (N (N-1) D):
    the fraction of differing signs averaged over pairs), ``pair_std`` (the standard deviation of
    the per-pair fractions over the N (N-1) / 2 unordered pairs) and ``pairs`` (the ``[N, N]``
    matrix of per-pair fractions).
    """
    n, d = eps.shape
    if n < 2:
        raise ConvlensError(f"Delta needs at least 2 images, got {n}")
    if d == 0:
        raise ConvlensError("Delta of an empty feature vector")
    h = sign_hamming(eps)
    raw = int(h.sum())  # the diagonal is 0
    frac = h.double().numpy() / d
    iu = np.triu_indices(n, 1)
    return {
        "raw": raw,
        "value": raw / (n * (n - 1) * d),
        "pair_std": float(frac[iu].std()),
        "pairs": frac,
        "units": d,
    }


def map_box(box: Sequence[float], image_size: tuple[int, int], preprocess) -> tuple[Box, bool]:
    """A box in an image's own pixels → the same region in model-input pixels, through
    ``preprocess`` (:class:`convlens.data.Preprocess`: resize the shorter side, centre crop).

    Edges are scaled by the resize factors and shifted by the crop offset, then rounded outward
    (``floor`` for the start, ``ceil`` for the end) so the mask covers the whole part, and clipped
    to the crop. Returns ``(box, clipped)``; a box that ends up empty (outside the crop) raises.
    """
    w, h = image_size
    rw, rh = preprocess.resized_size(w, h)
    left, top, right, bottom = preprocess.crop_box(w, h)
    ch, cw = preprocess.input_size
    sx, sy = rw / w, rh / h
    x0, y0, x1, y1 = (float(v) for v in box)
    # round() first so that 2 * 10.24 = 20.480000000000004 does not push an edge a pixel out
    fx0 = math.floor(round(x0 * sx - left, 6))
    fy0 = math.floor(round(y0 * sy - top, 6))
    fx1 = math.ceil(round(x1 * sx - left, 6))
    fy1 = math.ceil(round(y1 * sy - top, 6))
    cx0, cy0 = max(fx0, 0), max(fy0, 0)
    cx1, cy1 = min(fx1, cw), min(fy1, ch)
    if cx1 <= cx0 or cy1 <= cy0:
        raise ConvlensError(
            f"box {list(box)} lies outside the {cw}x{ch} centre crop the model sees"
        )
    clipped = (cx0, cy0, cx1, cy1) != (fx0, fy0, fx1, fy1)
    return (cx0, cy0, cx1, cy1), clipped


def apply_masks(
    x: torch.Tensor, boxes: Sequence[Box | None], fill: Sequence[float]
) -> torch.Tensor:
    """A copy of ``x`` ``[N, 3, H, W]`` with ``boxes[i]`` of image ``i`` set to ``fill`` (one
    value per channel, in the model's input space); ``None`` leaves an image unmasked."""
    if len(boxes) != x.shape[0]:
        raise ConvlensError(f"{len(boxes)} masks for {x.shape[0]} images")
    out = x.clone()
    value = torch.as_tensor(list(fill), dtype=x.dtype, device=x.device).view(-1, 1, 1)
    for i, b in enumerate(boxes):
        if b is None:
            continue
        x0, y0, x1, y1 = b
        out[i, :, y0:y1, x0:x1] = value
    return out


def random_box(rng: np.random.Generator, size: tuple[int, int], region: Box) -> Box:
    """A ``(w, h)`` box at a uniformly random integer position entirely inside ``region``
    (shrunk to the region if larger)."""
    w, h = size
    rx0, ry0, rx1, ry1 = region
    w, h = min(w, rx1 - rx0), min(h, ry1 - ry0)
    x0 = int(rng.integers(rx0, rx1 - w + 1))
    y0 = int(rng.integers(ry0, ry1 - h + 1))
    return (x0, y0, x0 + w, y0 + h)


def jitter_box(rng: np.random.Generator, box: Box, fraction: float, bounds: tuple[int, int]) -> Box:
    """``box`` shifted by a random integer offset of up to ``fraction`` of its width/height in
    each direction, kept inside ``bounds`` ``(W, H)``."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    mx, my = int(round(fraction * w)), int(round(fraction * h))
    dx = int(rng.integers(-mx, mx + 1))
    dy = int(rng.integers(-my, my + 1))
    bw, bh = bounds
    nx0 = min(max(x0 + dx, 0), bw - w)
    ny0 = min(max(y0 + dy, 0), bh - h)
    return (nx0, ny0, nx0 + w, ny0 + h)
