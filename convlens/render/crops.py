"""Receptive-field crops: where a unit's patch is cut from an image, for every figure that shows
one (the deconv probe's Fig. 2, Fig. 4 and Fig. 6 panels; the same boxes for any probe that shows
a unit beside its image patch).

Zeiler & Fergus, Section 4 / Fig. 2: a projection is shown beside "the corresponding image
patches" — the unit's receptive field. The rules, per layer (all units of a layer share one crop
size, so their tiles share one scale):

* **a local field** (smaller than the image): the unit's receptive-field box
  :meth:`~convlens.engine.ReceptiveField.box`, exactly;
* **a field as large as the image or larger** (deep layers of modern nets; global after pooling):
  the theoretical field says nothing, so the crop is the *effective* field: a square centred on
  the unit's field centre whose side is the median, over the layer's projections, of the smallest
  centred square holding ``MASS`` (90 %) of the projection's absolute mass (at least
  ``MIN_SIDE`` pixels, at most the image);
* **no position** (a fully connected unit): the whole image.

Boxes are ``(x0, y0, x1, y1)`` with exclusive ends and may reach outside the image; :func:`cut`
places what lies inside the image on a canvas of the box's size and fills the rest (clipped at
the image border, shown at the same scale as a box that is wholly inside).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from convlens.engine.receptive import ReceptiveField

__all__ = [
    "MASS", "MIN_SIDE", "crop_side", "unit_box", "unit_center", "cut", "mass_side", "is_local",
]  # fmt: skip

#: Share of a projection's absolute mass the effective field must hold.
MASS = 0.9
#: The smallest effective crop, in input pixels.
MIN_SIDE = 24


def _local(rf: ReceptiveField | None, hw: tuple[int, int]) -> bool:
    return rf is not None and not rf.is_global and rf.size[0] < hw[0] and rf.size[1] < hw[1]


def is_local(rf: ReceptiveField | None, hw: tuple[int, int]) -> bool:
    """Whether a layer's crops are its receptive-field boxes (the field is smaller than the
    image); if not, :func:`crop_side` needs the layer's projections (the effective field)."""
    return _local(rf, hw)


def unit_center(rf: ReceptiveField | None, y: int, x: int, hw: tuple[int, int]):
    """Centre ``(cy, cx)`` of unit ``(y, x)``'s field in input pixels (the image centre when the
    field is global or the unit has no position)."""
    H, W = hw
    if rf is None or rf.is_global or y < 0 or x < 0:
        return (H - 1) / 2.0, (W - 1) / 2.0
    cy, cx = rf.center_offset
    return cy + y * rf.stride[0], cx + x * rf.stride[1]


def mass_side(p: np.ndarray, center: tuple[float, float], mass: float = MASS) -> int:
    """The side of the smallest square centred on ``center`` that holds ``mass`` of ``|p|``'s
    total (``p``: ``[C, H, W]`` or ``[H, W]``); the image's longer side when ``p`` is all zero."""
    a = np.abs(np.asarray(p, dtype=np.float64))
    if a.ndim == 3:
        a = a.sum(0)
    H, W = a.shape
    total = a.sum()
    if not np.isfinite(total) or total <= 0:
        return max(H, W)
    ii = np.zeros((H + 1, W + 1))
    ii[1:, 1:] = a.cumsum(0).cumsum(1)
    cy, cx = int(round(center[0])), int(round(center[1]))
    r = np.arange(0, max(H, W) + 1)
    y0, y1 = np.clip(cy - r, 0, H), np.clip(cy + r + 1, 0, H)
    x0, x1 = np.clip(cx - r, 0, W), np.clip(cx + r + 1, 0, W)
    inside = ii[y1, x1] - ii[y0, x1] - ii[y1, x0] + ii[y0, x0]
    k = int(np.argmax(inside >= mass * total - 1e-12 * total))
    return int(2 * r[k] + 1)


def crop_side(
    rf: ReceptiveField | None,
    hw: tuple[int, int],
    projections: Sequence[np.ndarray] = (),
    centers: Sequence[tuple[float, float]] = (),
    mass: float = MASS,
    sides: Sequence[int] | None = None,
) -> tuple[int, int]:
    """One crop size ``(h, w)`` for a layer's units (module docstring): the receptive field when
    it is local, else the effective field measured on ``projections`` (with their unit
    ``centers``) — or given as their :func:`mass_side` values ``sides``, measured one batch at a
    time by a caller that does not hold every projection at once — else the whole image."""
    H, W = hw
    if _local(rf, hw):
        return int(rf.size[0]), int(rf.size[1])
    if sides is None:
        sides = [mass_side(p, c, mass) for p, c in zip(projections, centers, strict=True)]
    if not len(sides):
        return H, W
    side = int(np.median(sides))
    side = int(min(max(side, MIN_SIDE), H, W))
    return side, side


def unit_box(
    rf: ReceptiveField | None, y: int, x: int, hw: tuple[int, int], side: tuple[int, int]
) -> tuple[int, int, int, int]:
    """The crop box ``(x0, y0, x1, y1)`` of unit ``(y, x)`` for a layer whose crop size is
    ``side`` (from :func:`crop_side`): its receptive-field box when the field is local, else a
    ``side`` square centred on the unit's field centre (the whole image when ``side`` is)."""
    H, W = hw
    if _local(rf, hw) and tuple(side) == tuple(rf.size) and y >= 0 and x >= 0:
        return rf.box(y, x)
    sh, sw = int(side[0]), int(side[1])
    if sh >= H and sw >= W:
        return (0, 0, W, H)
    cy, cx = unit_center(rf, y, x, hw)
    y0 = int(round(cy - (sh - 1) / 2.0))
    x0 = int(round(cx - (sw - 1) / 2.0))
    return (x0, y0, x0 + sw, y0 + sh)


def cut(a: np.ndarray, box: tuple[int, int, int, int], fill: float = 0.0) -> np.ndarray:
    """``a`` ``[C, H, W]`` cut to ``box`` on a canvas of the box's size, ``fill`` (e.g. NaN)
    outside the image: the part inside keeps its place, so a box clipped at the border keeps the
    scale of the others."""
    c, H, W = a.shape
    x0, y0, x1, y1 = (int(v) for v in box)
    out = np.full((c, y1 - y0, x1 - x0), fill, dtype=np.float64)
    sy0, sy1, sx0, sx1 = max(y0, 0), min(y1, H), max(x0, 0), min(x1, W)
    if sy0 < sy1 and sx0 < sx1:
        out[:, sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = a[:, sy0:sy1, sx0:sx1]
    return out
