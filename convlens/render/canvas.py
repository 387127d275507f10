"""A pixel canvas with text: figures laid out in pixels (tiles pasted where they belong) and
labelled by matplotlib, so that every PNG stands on its own — title, labels, values, caption —
without the HTML report around it.

    c = Canvas(640, 400)
    c.title("Fig. 2 · conv5 of zfnet")
    c.paste(tile, x=10, y=40)
    c.text(10, 40 + 64, "3.21", size=6, box=True)
    c.caption("Left: projections; right: image patches.")
    c.save("fig2.png")

Coordinates are pixels from the top-left corner; ``size`` is in points at ``DPI`` (one point is
``DPI / 72`` pixels). :meth:`Canvas.title` and :meth:`Canvas.caption` grow the canvas at the top
and bottom as needed, so callers lay out the body only.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from convlens.io import atomic_path

__all__ = ["Canvas", "DPI", "text_width"]

DPI = 100


def text_width(s: str, size: float) -> float:
    """Rough width in pixels of ``s`` at ``size`` points (DejaVu Sans averages ~0.55 em)."""
    return len(s) * size * 0.55 * DPI / 72


def _line_px(size: float) -> float:
    return size * 1.35 * DPI / 72


@dataclass
class _Text:
    x: float
    y: float
    s: str
    size: float
    ha: str
    va: str
    color: str
    weight: str
    box: bool


@dataclass
class Canvas:
    """A white ``width`` × ``height`` body plus a title band and a caption band."""

    width: int
    height: int
    background: float = 1.0
    _img: np.ndarray = field(init=False, repr=False)
    _texts: list[_Text] = field(default_factory=list, init=False, repr=False)
    _title: list[tuple[str, float, str]] = field(default_factory=list, init=False, repr=False)
    _caption: list[tuple[str, float]] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self._img = np.full((int(self.height), int(self.width), 3), self.background)

    def paste(self, img: np.ndarray, x: int, y: int) -> None:
        """Paste an RGB float image ``[h, w, 3]`` (or grey ``[h, w]``) in [0, 1] at ``(x, y)``."""
        a = np.asarray(img, dtype=np.float64)
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, -1)
        h, w = a.shape[:2]
        x, y = int(x), int(y)
        y0, x0 = max(y, 0), max(x, 0)
        y1, x1 = min(y + h, self._img.shape[0]), min(x + w, self._img.shape[1])
        if y0 < y1 and x0 < x1:
            self._img[y0:y1, x0:x1] = np.clip(a[y0 - y : y1 - y, x0 - x : x1 - x], 0, 1)

    def rect(self, x: int, y: int, w: int, h: int, color=(0.0, 0.0, 0.0), width: int = 1) -> None:
        """An unfilled rectangle (a mark around a tile)."""
        c = np.asarray(color, dtype=np.float64)
        for t in range(width):
            self.paste(np.broadcast_to(c, (1, w - 2 * t, 3)), x + t, y + t)
            self.paste(np.broadcast_to(c, (1, w - 2 * t, 3)), x + t, y + h - 1 - t)
            self.paste(np.broadcast_to(c, (h - 2 * t, 1, 3)), x + t, y + t)
            self.paste(np.broadcast_to(c, (h - 2 * t, 1, 3)), x + w - 1 - t, y + t)

    def text(
        self,
        x: float,
        y: float,
        s: str,
        size: float = 7,
        ha: str = "left",
        va: str = "top",
        color: str = "black",
        weight: str = "normal",
        box: bool = False,
    ) -> None:
        """Text at pixel ``(x, y)`` of the body; ``box``: white on a dark translucent box (a
        label on top of an image tile)."""
        self._texts.append(_Text(x, y, s, size, ha, va, color, weight, box))

    def title(self, s: str, size: float = 10, weight: str = "bold") -> None:
        """A line of the title band (call again for a subtitle); long lines are wrapped."""
        for line in self._wrap(s, size):
            self._title.append((line, size, weight))

    def caption(self, s: str, size: float = 7) -> None:
        """A paragraph of the caption band under the body (wrapped to the width)."""
        for line in self._wrap(s, size):
            self._caption.append((line, size))

    def _wrap(self, s: str, size: float) -> list[str]:
        chars = max(20, int((self.width - 16) / (size * 0.55 * DPI / 72)))
        return textwrap.wrap(s, chars) or [""]

    def render(self) -> np.ndarray:
        """The finished figure as an RGB float array ``[H, W, 3]``."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        top = 8 + sum(_line_px(sz) for _, sz, _ in self._title) + (6 if self._title else 0)
        bottom = (10 + sum(_line_px(sz) for _, sz in self._caption)) if self._caption else 4
        top, bottom = int(np.ceil(top)), int(np.ceil(bottom))
        W, H = self.width, self.height + top + bottom
        full = np.full((H, W, 3), 1.0)
        full[top : top + self.height] = self._img
        fig = Figure(figsize=(W / DPI, H / DPI), dpi=DPI)
        FigureCanvasAgg(fig)
        ax = fig.add_axes((0, 0, 1, 1))
        ax.imshow(full, interpolation="nearest", extent=(0, W, H, 0))
        ax.set_xlim(0, W)
        ax.set_ylim(H, 0)
        ax.set_axis_off()
        y = 8.0
        for line, sz, weight in self._title:
            ax.text(8, y, line, fontsize=sz, weight=weight, ha="left", va="top")
            y += _line_px(sz)
        for t in self._texts:
            kw = {}
            if t.box:
                kw["bbox"] = {"boxstyle": "square,pad=0.12", "fc": "black", "alpha": 0.6, "lw": 0}
            ax.text(t.x, t.y + top, t.s, fontsize=t.size, ha=t.ha, va=t.va,
                    color="white" if t.box else t.color, weight=t.weight, **kw)  # fmt: skip
        y = top + self.height + 8.0
        for line, sz in self._caption:
            ax.text(8, y, line, fontsize=sz, ha="left", va="top", color="#222222")
            y += _line_px(sz)
        fig.canvas.draw()
        rgba = np.asarray(fig.canvas.buffer_rgba(), dtype=np.float64) / 255.0
        return rgba[..., :3]

    def save(self, path: str | Path) -> Path:
        """Render and write a PNG (atomically)."""
        from PIL import Image

        arr = (np.clip(self.render(), 0, 1) * 255 + 0.5).astype(np.uint8)
        path = Path(path)
        with atomic_path(path) as tmp:
            Image.fromarray(arr).save(tmp, format="PNG")
        return path
