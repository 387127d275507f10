"""The image transformations of Fig. 5 (Zeiler & Fergus 2014, Section 4): vertical translation,
scaling and rotation, applied to what the model sees.

Each transform maps the model's centre crop to a new crop sampled from the *resized* image (the
preprocessing's resize before its centre crop), so content that moves into view comes from the
photo itself where the photo has it; only what lies beyond the photo's edges is filled (the
``canvas``: ``"mean"`` — the normalisation mean, zero in model space —, ``"border"`` — the nearest
edge pixel — or ``"reflect"``). Sampling is bilinear (``torch.nn.functional.grid_sample``); an
identity transform reproduces the centre crop.

Amounts, as in Fig. 5: translation in model-input pixels (positive moves the content down),
scale as a zoom factor about the crop centre (2 shows the content twice as large), rotation in
degrees, counter-clockwise on screen, about the crop centre.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from convlens.data import INTERPOLATIONS, Preprocess
from convlens.errors import ConvlensError

__all__ = [
    "TRANSFORMS",
    "CANVAS",
    "DEFAULT_AMOUNTS",
    "IDENTITY",
    "UNITS",
    "amounts_for",
    "resized_tensor",
    "warp",
]

TRANSFORMS: tuple[str, ...] = ("translate", "scale", "rotate")
#: canvas name → ``grid_sample`` padding mode
CANVAS: dict[str, str] = {"mean": "zeros", "border": "border", "reflect": "reflection"}
IDENTITY: dict[str, float] = {"translate": 0.0, "scale": 1.0, "rotate": 0.0}
UNITS: dict[str, str] = {"translate": "px", "scale": "x", "rotate": "deg"}
#: The ranges of Fig. 5, with the paper's end points.
RANGES: dict[str, tuple[float, float]] = {
    "translate": (-60.0, 60.0),
    "scale": (0.5, 1.6),
    "rotate": (0.0, 350.0),
}
#: Default amounts: Fig. 5's ranges at steps the demo budget affords (7 + 9 + 11 amounts).
DEFAULT_AMOUNTS: dict[str, tuple[float, ...]] = {
    "translate": (-60.0, -40.0, -20.0, 0.0, 20.0, 40.0, 60.0),
    "scale": (0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.4, 1.6),
    "rotate": tuple(float(a) for a in range(0, 351, 35)),
}


def amounts_for(kind: str, steps: int | None = None) -> list[float]:
    """The amounts of transform ``kind``: :data:`DEFAULT_AMOUNTS`, or ``steps`` evenly spaced
    over Fig. 5's range (the identity is always included)."""
    if kind not in TRANSFORMS:
        raise ConvlensError(f"transform {kind!r}: expected one of {', '.join(TRANSFORMS)}")
    if steps is None:
        return list(DEFAULT_AMOUNTS[kind])
    if steps < 2:
        raise ConvlensError(f"--steps {steps}: need at least 2 amounts per transform")
    lo, hi = RANGES[kind]
    values = {round(float(v), 6) for v in np.linspace(lo, hi, steps)}
    values.add(IDENTITY[kind])
    return sorted(values)


def resized_tensor(img: Image.Image, pre: Preprocess) -> torch.Tensor:
    """The image after the preprocessing's resize (before its crop), normalised: ``[3, Hr, Wr]``."""
    img = img if img.mode == "RGB" else img.convert("RGB")
    size = pre.resized_size(*img.size)
    resized = img.resize(size, INTERPOLATIONS[pre.interpolation])
    arr = np.asarray(resized, dtype=np.uint8).copy()
    x = torch.from_numpy(arr).permute(2, 0, 1).float().div(255)
    return pre.normalize(x)


def _matrix(kind: str, amount: float) -> tuple[np.ndarray, np.ndarray]:
    """``(A, b)`` with source = A @ (output - centre) + centre + b, in pixel units."""
    if kind == "translate":
        return np.eye(2), np.array([0.0, -float(amount)])
    if kind == "scale":
        if amount <= 0:
            raise ConvlensError(f"scale {amount}: must be positive")
        return np.eye(2) / float(amount), np.zeros(2)
    if kind == "rotate":
        # content turns counter-clockwise on screen (y down): sample the output pixel's position
        # turned back, clockwise
        t = math.radians(float(amount))
        c, s = math.cos(t), math.sin(t)
        return np.array([[c, -s], [s, c]]), np.zeros(2)
    raise ConvlensError(f"transform {kind!r}: expected one of {', '.join(TRANSFORMS)}")


def warp(
    resized: torch.Tensor,
    crop_box: Sequence[int],
    kind: str,
    amounts: Sequence[float],
    canvas: str = "mean",
) -> torch.Tensor:
    """The model's crop of ``resized`` ``[3, Hr, Wr]`` (model space) after each amount of
    transform ``kind``: ``[len(amounts), 3, h, w]``, ``crop_box = (left, top, right, bottom)``."""
    if canvas not in CANVAS:
        raise ConvlensError(f"canvas {canvas!r}: expected one of {', '.join(CANVAS)}")
    left, top, right, bottom = (int(v) for v in crop_box)
    h, w = bottom - top, right - left
    hr, wr = resized.shape[-2:]
    cx, cy = left + w / 2.0, top + h / 2.0
    # output pixel centres relative to the crop centre
    ys = torch.arange(h, dtype=torch.float64) + 0.5 - h / 2.0
    xs = torch.arange(w, dtype=torch.float64) + 0.5 - w / 2.0
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    grids = []
    for amount in amounts:
        a, b = _matrix(kind, amount)
        sx = a[0, 0] * gx + a[0, 1] * gy + cx + b[0]
        sy = a[1, 0] * gx + a[1, 1] * gy + cy + b[1]
        # grid_sample, align_corners=False: -1 and 1 are the outer pixel edges
        grids.append(torch.stack((2.0 * sx / wr - 1.0, 2.0 * sy / hr - 1.0), dim=-1))
    grid = torch.stack(grids).to(resized.dtype)
    src = resized.unsqueeze(0).expand(len(amounts), -1, -1, -1)
    return F.grid_sample(
        src, grid, mode="bilinear", padding_mode=CANVAS[canvas], align_corners=False
    )
