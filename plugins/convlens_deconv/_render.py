"""Figures of the deconv probe: Fig. 2 grids, the poster row, Fig. 4 evolution, Fig. 6 tiles.

**Contrast normalisation of projections** (documented in ``docs/probes/deconv.md``): every
projection is shown on its own scale — ``0.5 + p / (2·max|p|)`` over the displayed crop, all three
colour channels together (:func:`convlens.render.contrast_stretch`): zero is mid-grey, the sign is
kept, and the strongest pixel of *that* projection reaches black or white. Absolute magnitudes are
in ``deconv.npz``.

**Crops.** Fig. 2 shows each projection and its image patch cropped to the projected unit's
receptive field: the box ``ReceptiveField.box(y, x)`` (unclipped; parts outside the image are
filled — grey in the patch, zero in the projection — so every tile has the field's geometry).
Where the field is global or larger than the image, the whole image is shown.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from convlens.engine import ReceptiveField
from convlens.render import contrast_stretch, grid

__all__ = [
    "seed_box",
    "crop",
    "resize",
    "projection_tile",
    "patch_tile",
    "fig2_grid",
    "poster_grid",
    "filter_tile",
    "evolution_grid",
    "blank",
]


def seed_box(
    rf: ReceptiveField | None, y: int, x: int, hw: tuple[int, int]
) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """``(crop box, clipped box)`` of a unit at ``(y, x)``, as ``(x0, y0, x1, y1)``."""
    H, W = hw
    whole = (0, 0, W, H)
    if rf is None or rf.is_global or y < 0 or x < 0 or rf.size[0] >= H or rf.size[1] >= W:
        return whole, whole
    return rf.box(y, x), rf.box(y, x, clip_to=(H, W))


def crop(a: np.ndarray, box: tuple[int, int, int, int], fill: float) -> np.ndarray:
    """``a`` ``[C, H, W]`` cropped to ``box`` (may reach outside: filled with ``fill``)."""
    c, H, W = a.shape
    x0, y0, x1, y1 = box
    out = np.full((c, y1 - y0, x1 - x0), fill, dtype=np.float64)
    sy0, sy1, sx0, sx1 = max(y0, 0), min(y1, H), max(x0, 0), min(x1, W)
    if sy0 < sy1 and sx0 < sx1:
        out[:, sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = a[:, sy0:sy1, sx0:sx1]
    return out


def resize(rgb01: np.ndarray, size: int) -> np.ndarray:
    """``[3, h, w]`` or ``[h, w, 3]`` float [0, 1] → ``[size, size, 3]`` (box filter)."""
    a = np.asarray(rgb01)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.transpose(a, (1, 2, 0))
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, -1)
    img = Image.fromarray((np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8))
    if img.size != (size, size):
        img = img.resize((size, size), Image.BOX if img.width > size else Image.NEAREST)
    return np.asarray(img).astype(np.float64) / 255.0


def projection_tile(p: np.ndarray, box, size: int) -> np.ndarray:
    """A projection ``[3, H, W]`` cropped to ``box``, contrast-stretched on its own, resized."""
    return resize(contrast_stretch(crop(p, box, 0.0)), size)


def patch_tile(img01: np.ndarray, box, size: int) -> np.ndarray:
    """An image ``[3, H, W]`` in [0, 1] cropped to ``box`` (grey outside), resized."""
    return resize(crop(img01, box, 0.5), size)


def blank(size: int, value: float = 1.0) -> np.ndarray:
    return np.full((size, size, 3), value)


def fig2_grid(
    blocks: Sequence[tuple[list[np.ndarray], list[np.ndarray]]],
    tile: int,
    per_row: int = 2,
    k: int = 9,
) -> np.ndarray:
    """Fig. 2 layout: for each channel a block of its top-``k`` projections (3 per row) beside
    the matching image patches; ``per_row`` channel blocks side by side."""
    side = int(np.ceil(np.sqrt(k)))
    rendered = []
    for projs, patches in blocks:
        projs = list(projs) + [blank(tile)] * (side * side - len(projs))
        patches = list(patches) + [blank(tile)] * (side * side - len(patches))
        left = grid(projs[: side * side], side, pad=1)
        right = grid(patches[: side * side], side, pad=1)
        gap = np.ones((left.shape[0], 4, 3))
        rendered.append(np.concatenate([left, gap, right], axis=1))
    if not rendered:
        return blank(tile)
    return grid(rendered, min(per_row, len(rendered)), pad=8, pad_value=0.85)


def poster_grid(rows: Sequence[list[np.ndarray]]) -> np.ndarray:
    """The poster figure: one row per image — the image, then its strongest activation in each
    layer projected to pixels (layers side by side)."""
    ncol = max(len(r) for r in rows)
    tiles = [t for r in rows for t in list(r) + [blank(r[0].shape[0])] * (ncol - len(r))]
    return grid(tiles, ncol, pad=3)


def filter_tile(weight: torch.Tensor, per_filter: bool = True, scale: int = 0) -> np.ndarray:
    """Fig. 6 tile of first-layer filters ``[C_out, C_in, k, k]``: RGB when ``C_in == 3`` (else
    the mean over inputs, grey). ``per_filter``: each filter stretched on its own
    (``0.5 + w / (2·max|w|)``); otherwise one scale for the layer (a dominating filter stands out,
    Fig. 6(a))."""
    w = weight.detach().float().cpu().numpy()
    if w.shape[1] != 3:
        w = np.repeat(w.mean(axis=1, keepdims=True), 3, axis=1)
    layer_max = np.abs(w).max() or 1.0
    k = w.shape[-1]
    scale = scale or max(1, 48 // k)
    tiles = []
    for f in w:
        m = (np.abs(f).max() or 1.0) if per_filter else layer_max
        t = np.clip(0.5 + f / (2 * m), 0, 1).transpose(1, 2, 0)
        tiles.append(np.kron(t, np.ones((scale, scale, 1))))
    ncol = int(np.ceil(np.sqrt(len(tiles))))
    return grid(tiles, ncol, pad=2, pad_value=1.0)


def evolution_grid(cells: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
    """Fig. 4 layout: rows = channels, columns = snapshots; each cell an RGB tile."""
    ncol = max(len(r) for r in cells)
    return grid([t for r in cells for t in r], ncol, pad=3)
