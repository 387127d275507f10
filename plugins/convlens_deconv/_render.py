"""Figures of the deconv probe: Fig. 2 grids, the poster row, Fig. 4 evolution, Fig. 6 tiles.

**Contrast normalisation of projections** (documented in ``docs/probes/deconv.md``): every
projection is shown on its own scale, robustly — ``0.5 + p / (2·s)`` clipped to [0, 1], with ``s``
the 99.5th percentile of ``|p|`` over the displayed crop's non-zero values, all three colour
channels together (:func:`convlens.render.robust_stretch`): zero is mid-grey, the sign is kept,
and a few extreme pixels saturate instead of turning the rest of the tile grey. Absolute
magnitudes are in ``deconv.npz``.

**Crops** (:mod:`convlens.render.crops`, shared with every probe that shows a unit's patch):
Fig. 2 shows each projection and its image patch cut to the projected unit's receptive field —
its box when the field is smaller than the image, else the effective field (where 90% of the
projections' mass lies) — clipped at the image border and placed so all tiles of a layer share one
scale (outside the image: light grey).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from convlens.engine import ReceptiveField
from convlens.render import grid, robust_stretch
from convlens.render.canvas import Canvas, text_width

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
    "UnitTiles",
    "fig2_canvas",
    "poster_canvas",
    "filters_canvas",
    "titled",
    "BACKGROUND",
]

#: Colour of the parts of a crop outside the image.
BACKGROUND = 0.92


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
    """A projection ``[3, H, W]`` cut to ``box``, robustly contrast-normalised on its own (module
    docstring), resized; outside the image: :data:`BACKGROUND`."""
    return resize(robust_stretch(crop(p, box, np.nan), background=BACKGROUND), size)


def patch_tile(img01: np.ndarray, box, size: int) -> np.ndarray:
    """An image ``[3, H, W]`` in [0, 1] cut to ``box`` (:data:`BACKGROUND` outside), resized."""
    return resize(crop(img01, box, BACKGROUND), size)


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def _short(name: str, n: int = 14) -> str:
    stem = Path(name).stem
    if stem.startswith("crop_") and stem[5:9].isdigit():  # mining-set crops: the photo's name
        stem = stem[10:] + "#" + stem[5:9].lstrip("0")
    return stem if len(stem) <= n else stem[: n - 1] + "…"


@dataclass
class UnitTiles:
    """One unit of Fig. 2: its top-k projections and image patches (already cut and turned into
    RGB tiles), their activation values and source image names, best first."""

    channel: int
    projections: list[np.ndarray]
    patches: list[np.ndarray]
    activations: list[float]
    names: list[str] = field(default_factory=list)


def fig2_canvas(
    units: Sequence[UnitTiles], title: Sequence[str], caption: Sequence[str], per_row: int = 2
) -> Canvas:
    """Fig. 2 as the paper draws it: per unit, its projections (left, up to 3 per row) beside the
    matching patches (right), the unit id and the activation values and image names on the tiles;
    no empty rows (fewer than 9 tiles take fewer rows)."""
    tile = units[0].projections[0].shape[0] if units and units[0].projections else 64
    m = max((len(u.projections) for u in units), default=1)
    cols, rows = min(3, m), math.ceil(m / 3)
    pad, gap, margin, head = 2, 8, 14, 16
    gw = cols * tile + (cols - 1) * pad
    bw, bh = 2 * gw + gap, head + rows * tile + (rows - 1) * pad
    per_row = max(1, min(per_row, len(units)))
    nrow = math.ceil(len(units) / per_row)
    width = max(per_row * bw + (per_row + 1) * margin, 520)
    c = Canvas(width, nrow * (bh + margin) + margin // 2)
    for line in title[:1]:
        c.title(line)
    for line in title[1:]:
        c.title(line, size=8, weight="normal")
    for i, u in enumerate(units):
        r, q = divmod(i, per_row)
        x0, y0 = margin + q * (bw + margin), margin // 2 + r * (bh + margin)
        lo, hi = min(u.activations), max(u.activations)
        c.text(x0, y0, f"unit {u.channel}", size=7.5, weight="bold")
        c.text(x0 + text_width(f"unit {u.channel}", 7.5) + 8, y0 + 1,
               f"activations {_fmt(hi)} … {_fmt(lo)}", size=6.5, color="#444444")  # fmt: skip
        for j, (p, patch) in enumerate(zip(u.projections, u.patches, strict=True)):
            rr, cc = divmod(j, 3)
            ty = y0 + head + rr * (tile + pad)
            px = x0 + cc * (tile + pad)
            c.paste(p, px, ty)
            c.paste(patch, x0 + gw + gap + cc * (tile + pad), ty)
            c.text(px + 2, ty + tile - 2, _fmt(u.activations[j]), size=5.5, va="bottom", box=True)
            if j < len(u.names):
                c.text(x0 + gw + gap + cc * (tile + pad) + 2, ty + tile - 2,
                       _short(u.names[j], max(6, tile // 6)), size=5, va="bottom",
                       box=True)  # fmt: skip
    for line in caption:
        c.caption(line)
    return c


def poster_canvas(
    images: Sequence[np.ndarray],
    names: Sequence[str],
    columns: Sequence[str],
    cells: Sequence[Sequence[np.ndarray]],
    labels: Sequence[Sequence[str]],
    title: Sequence[str],
    caption: Sequence[str],
) -> Canvas:
    """The poster: a row per image — the image, then its strongest unit in each layer projected
    to pixels; a header per column (``columns``), a label per cell (``labels``)."""
    size = images[0].shape[0]
    pad, margin, head = 4, 10, 40
    ncol = 1 + len(columns)
    width = max(ncol * (size + pad) - pad + 2 * margin, 520)
    c = Canvas(width, head + len(images) * (size + pad) + margin)
    c.title(title[0])
    for line in title[1:]:
        c.title(line, size=8, weight="normal")
    heads = ["image", *columns]
    for k, h in enumerate(heads):
        for n, line in enumerate(h.split("\n")[:3]):
            c.text(margin + k * (size + pad) + size / 2, 1 + n * 12, line, size=6 if n else 7,
                   ha="center", weight="bold" if n == 0 else "normal")  # fmt: skip
    for r, img in enumerate(images):
        y = head + r * (size + pad)
        c.paste(img, margin, y)
        c.text(margin + 2, y + size - 2, _short(names[r], size // 6), size=5.5, va="bottom",
               box=True)  # fmt: skip
        for k, cell in enumerate(cells[r]):
            x = margin + (k + 1) * (size + pad)
            c.paste(cell, x, y)
            c.text(x + 2, y + size - 2, labels[r][k], size=5.5, va="bottom", box=True)
    for line in caption:
        c.caption(line)
    return c


def filters_canvas(
    weight: torch.Tensor,
    title: Sequence[str],
    caption: Sequence[str],
    dead: Sequence[int] = (),
    dominating: int | None = None,
) -> Canvas:
    """Fig. 6: first-layer filters on one scale for the layer (left) and each on its own
    (right); every filter numbered; dead filters framed red, the dominating one orange."""
    a, b = filter_tile(weight, per_filter=False), filter_tile(weight)
    n = int(weight.shape[0])
    ncol = int(np.ceil(np.sqrt(n)))
    k = int(weight.shape[-1])
    scale = max(1, 48 // k)
    cell = k * scale + 2  # filter_tile: tiles of k*scale with pad 2
    margin, gap, head = 12, 24, 16
    width = max(2 * a.shape[1] + gap + 2 * margin, 520)
    c = Canvas(width, head + a.shape[0] + margin)
    c.title(title[0])
    for line in title[1:]:
        c.title(line, size=8, weight="normal")
    for x0, img, label in (
        (margin, a, "one scale for the layer"),
        (margin + a.shape[1] + gap, b, "each filter on its own scale"),
    ):
        c.text(x0, 0, label, size=7, weight="bold")
        c.paste(img, x0, head)
        for i in range(n):
            r, q = divmod(i, ncol)
            tx, ty = x0 + 2 + q * cell, head + 2 + r * cell
            if i in set(dead):
                c.rect(tx - 1, ty - 1, cell, cell, (0.85, 0.1, 0.1), 2)
            elif dominating is not None and i == dominating:
                c.rect(tx - 1, ty - 1, cell, cell, (1.0, 0.55, 0.0), 2)
            if cell >= 20:
                c.text(tx + 1, ty + 1, str(i), size=4.5, box=True)
    for line in caption:
        c.caption(line)
    return c


def titled(img: np.ndarray, title: Sequence[str], caption: Sequence[str]) -> Canvas:
    """Any figure array with a title band and a caption band (paste-ready on its own)."""
    h, w = img.shape[:2]
    c = Canvas(max(w + 20, 520), h + 10)
    c.paste(img, 10, 5)
    c.title(title[0])
    for line in title[1:]:
        c.title(line, size=8, weight="normal")
    for line in caption:
        c.caption(line)
    return c


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
