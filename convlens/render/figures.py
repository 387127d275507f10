"""Small, dependency-light figure helpers (NumPy + Pillow; matplotlib only for colormaps).

Arrays are ``[H, W]`` (grey) or ``[H, W, 3]`` / ``[3, H, W]`` (RGB), float in [0, 1] or uint8.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from convlens.io import atomic_path

__all__ = [
    "to_uint8",
    "contrast_stretch",
    "robust_stretch",
    "ROBUST_PERCENTILE",
    "grid",
    "save_png",
    "colormap",
    "overlay",
]

#: :func:`robust_stretch` maps this percentile of ``|a|`` (non-zero, finite values) to full scale.
ROBUST_PERCENTILE = 99.5


def _hwc(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.transpose(a, (1, 2, 0))
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    return a


def to_uint8(a: np.ndarray) -> np.ndarray:
    """Float [0, 1] (clipped) or uint8 → uint8, channels last."""
    a = _hwc(a)
    if a.dtype == np.uint8:
        return a
    return (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def contrast_stretch(a: np.ndarray, percentile: float = 0.0) -> np.ndarray:
    """Map an array to [0, 1] around zero: ``0.5 + a / (2·max|a|)`` so that zero is mid-grey
    and the sign is kept (the usual rendering of deconvnet projections). ``percentile`` > 0 uses
    that percentile of |a| instead of the maximum (robust to a few extreme pixels)."""
    a = np.asarray(a, dtype=np.float64)
    scale = np.percentile(np.abs(a), 100 - percentile) if percentile > 0 else np.abs(a).max()
    if not np.isfinite(scale) or scale <= 0:
        return np.full(a.shape, 0.5)
    return np.clip(0.5 + a / (2.0 * scale), 0.0, 1.0)


def robust_stretch(
    a: np.ndarray, percentile: float = ROBUST_PERCENTILE, background: float = 0.92
) -> np.ndarray:
    """Signed values to [0, 1] robustly: ``0.5 + a / (2·s)`` clipped, with ``s`` the
    ``percentile``-th percentile of ``|a|`` over its finite non-zero entries (zero stays
    mid-grey, the sign is kept, a few extreme pixels saturate instead of turning the rest grey).
    NaN entries (e.g. outside the image) become ``background``."""
    a = np.asarray(a, dtype=np.float64)
    finite = np.isfinite(a)
    vals = np.abs(a[finite & (a != 0)])
    scale = float(np.percentile(vals, percentile)) if vals.size else 0.0
    if scale <= 0:
        out = np.full(a.shape, 0.5)
    else:
        out = np.clip(0.5 + np.where(finite, a, 0.0) / (2.0 * scale), 0.0, 1.0)
    return np.where(finite, out, background)


def grid(
    tiles: Sequence[np.ndarray], ncol: int, pad: int = 2, pad_value: float = 1.0
) -> np.ndarray:
    """Tile equally sized images (float [0,1], HW or HWC) into one ``[H, W, 3]`` array."""
    tiles = [_hwc(t) for t in tiles]
    if not tiles:
        raise ValueError("grid of no tiles")
    tiles = [np.repeat(t[..., None], 3, -1) if t.ndim == 2 else t for t in tiles]
    tiles = [t.astype(np.float64) / 255.0 if t.dtype == np.uint8 else t for t in tiles]
    h = max(t.shape[0] for t in tiles)
    w = max(t.shape[1] for t in tiles)
    nrow = (len(tiles) + ncol - 1) // ncol
    out = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), pad_value, dtype=np.float64)
    for i, t in enumerate(tiles):
        r, c = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        out[y : y + t.shape[0], x : x + t.shape[1]] = t
    return out


def save_png(a: np.ndarray, path: str | Path, scale: int = 1) -> Path:
    """Write an array as PNG (atomically); ``scale`` > 1 enlarges with nearest neighbour."""
    img = Image.fromarray(to_uint8(a))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path


def colormap(values: np.ndarray, name: str = "jet", vmin=None, vmax=None) -> np.ndarray:
    """Scalar map → RGB float [0, 1] through a matplotlib colormap."""
    import matplotlib

    v = np.asarray(values, dtype=np.float64)
    lo = np.nanmin(v) if vmin is None else vmin
    hi = np.nanmax(v) if vmax is None else vmax
    norm = (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)
    return matplotlib.colormaps[name](np.clip(norm, 0, 1))[..., :3]


def overlay(
    image: np.ndarray, heat: np.ndarray, alpha: float = 0.5, cmap: str = "jet", vmin=None, vmax=None
) -> np.ndarray:
    """Blend a scalar map (any size; resized bilinearly) over an RGB image in [0, 1]."""
    image = _hwc(image).astype(np.float64)
    if image.max() > 1.0:
        image = image / 255.0
    h, w = image.shape[:2]
    heat_img = Image.fromarray(np.asarray(heat, dtype=np.float32), mode="F").resize(
        (w, h), Image.BILINEAR
    )
    rgb = colormap(np.asarray(heat_img), cmap, vmin, vmax)
    return (1 - alpha) * image + alpha * rgb
