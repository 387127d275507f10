"""Occluder geometry: where the grey square goes (Zeiler & Fergus 2014, Section 4.2, Fig. 7).

The grid is Captum's ``Occlusion`` grid, so the two can be compared position by position: along
each axis the square starts at ``0, stride, 2·stride, …`` up to and including the first start at or
beyond ``size − window`` (``ceil((size − window) / stride) + 1`` positions). The last square of a
row or column may stick out of the image; only its part inside the image is painted, so every pixel
is covered when ``stride ≤ window``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from convlens.errors import ConvlensError

__all__ = ["OcclusionGrid", "default_window", "fill_tensor", "paint", "masks"]

#: Fig. 7's occluder at the paper's 224×224 input, rescaled for other input sizes.
REFERENCE_SIZE = 224
REFERENCE_WINDOW = 32
REFERENCE_STRIDE = 8


def default_window(size: int, reference: int = REFERENCE_WINDOW) -> int:
    """``reference`` pixels at a 224-pixel input, scaled to ``size`` (at least 1)."""
    return max(1, int(round(reference * size / REFERENCE_SIZE)))


@dataclass(frozen=True)
class OcclusionGrid:
    """Every position of a ``window``×``window`` square moved by ``stride`` over an
    ``height``×``width`` input. Positions are numbered row-major: ``p = row * cols + col``."""

    height: int
    width: int
    window: int
    stride: int

    def __post_init__(self) -> None:
        for what, v in (("window", self.window), ("stride", self.stride)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ConvlensError(f"occlusion {what} {v!r}: must be a positive whole number")
        if self.window > min(self.height, self.width):
            raise ConvlensError(
                f"occlusion window {self.window}: larger than the {self.height}x{self.width} input"
            )

    @staticmethod
    def _count(size: int, window: int, stride: int) -> int:
        return math.ceil((size - window) / stride) + 1

    @property
    def rows(self) -> int:
        return self._count(self.height, self.window, self.stride)

    @property
    def cols(self) -> int:
        return self._count(self.width, self.window, self.stride)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    def __len__(self) -> int:
        return self.rows * self.cols

    def starts(self) -> tuple[np.ndarray, np.ndarray]:
        """``(y0, x0)`` of every position, each ``[rows * cols]`` (row-major)."""
        ys = np.arange(self.rows) * self.stride
        xs = np.arange(self.cols) * self.stride
        yy, xx = np.meshgrid(ys, xs, indexing="ij")
        return yy.reshape(-1), xx.reshape(-1)

    def boxes(self) -> np.ndarray:
        """``[rows * cols, 4]`` boxes ``(x0, y0, x1, y1)`` in input pixels (exclusive ends),
        clipped to the input: what is painted at each position."""
        y0, x0 = self.starts()
        y1 = np.minimum(y0 + self.window, self.height)
        x1 = np.minimum(x0 + self.window, self.width)
        return np.stack([x0, y0, x1, y1], axis=1).astype(np.int64)

    def coverage(self) -> np.ndarray:
        """``[H, W]``: how many squares cover each pixel."""
        count = np.zeros((self.height, self.width), dtype=np.int64)
        for x0, y0, x1, y1 in self.boxes():
            count[y0:y1, x0:x1] += 1
        return count

    def to_dict(self) -> dict:
        return {
            "input_size": [self.height, self.width],
            "window": self.window,
            "stride": self.stride,
            "rows": self.rows,
            "cols": self.cols,
            "order": "row-major: position p = row * cols + col",
            "boxes": self.boxes().tolist(),
        }


def fill_tensor(fill: Sequence[float] | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The fill colour as a ``[C, 1, 1]`` tensor of ``like``'s dtype and device."""
    f = torch.as_tensor(fill, dtype=like.dtype, device=like.device).reshape(-1)
    channels = like.shape[-3]
    if f.numel() == 1:
        f = f.expand(channels)
    if f.numel() != channels:
        raise ConvlensError(f"occlusion fill: {f.numel()} values for a {channels}-channel input")
    return f.reshape(channels, 1, 1)


def masks(grid: OcclusionGrid, positions: Sequence[int] | np.ndarray, device=None) -> torch.Tensor:
    """``[len(positions), 1, H, W]`` booleans: the painted pixels of each position."""
    boxes = torch.as_tensor(grid.boxes()[np.asarray(positions, dtype=np.int64)], device=device)
    rows = torch.arange(grid.height, device=device)
    cols = torch.arange(grid.width, device=device)
    in_y = (rows[None, :] >= boxes[:, 1:2]) & (rows[None, :] < boxes[:, 3:4])
    in_x = (cols[None, :] >= boxes[:, 0:1]) & (cols[None, :] < boxes[:, 2:3])
    return (in_y[:, :, None] & in_x[:, None, :]).unsqueeze(1)


def paint(
    image: torch.Tensor,
    grid: OcclusionGrid,
    positions: Sequence[int] | np.ndarray,
    fill: torch.Tensor,
) -> torch.Tensor:
    """``[len(positions), C, H, W]``: copies of ``image`` (``[C, H, W]``) with the square of each
    position painted with ``fill`` (``[C, 1, 1]``, model input space)."""
    m = masks(grid, positions, device=image.device)
    return torch.where(m, fill.to(image.dtype), image.unsqueeze(0))
