"""Fig. 7 of Zeiler & Fergus 2014, one row per image: (a) the image and the grey square, (b) the
probed feature map's total activity, (c) its deconv projection (when the deconv probe is
installed), (d) the correct-class probability over the image, (e) the most probable label, with a
legend of class names — (b), (d) and (e) as functions of the square's position.

The panels are composed as arrays (each map cell drawn at its square's centre, one stride wide);
matplotlib only adds the titles and the legend around them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from convlens.render import colormap, grid

__all__ = ["figure", "label_colors", "short_name", "cells_to_pixels"]

_OTHER = (0.6, 0.6, 0.6)
_BLANK = 1.0  # white outside the span of square centres


def short_name(name: str) -> str:
    """``"tench, Tinca tinca"`` → ``"tench"``."""
    return name.split(",")[0].strip()


def label_colors(labels: np.ndarray, first: int | None = None, most: int = 9) -> dict[int, tuple]:
    """A colour per class of a label map, by area (``first`` always gets the first colour);
    classes beyond ``most`` share grey."""
    import matplotlib

    values, counts = np.unique(labels, return_counts=True)
    order = [int(v) for _, v in sorted(zip(-counts, values, strict=True))]
    if first is not None and first in order:
        order.remove(first)
        order.insert(0, first)
    cmap = matplotlib.colormaps["tab10"]
    return {
        c: (tuple(float(v) for v in cmap(i if i < 7 else i + 1)[:3]) if i < most else _OTHER)
        for i, c in enumerate(order)
    }


def cells_to_pixels(grid_) -> tuple[np.ndarray, np.ndarray]:
    """For every input row / column, the map row / column whose square is centred nearest
    (−1 outside the span of centres ± half a stride)."""
    s, k = grid_.stride, grid_.window

    def axis(size: int, count: int) -> np.ndarray:
        first = (k - 1) / 2.0
        pos = np.arange(size, dtype=np.float64)
        idx = np.floor((pos - first) / s + 0.5).astype(np.int64)
        inside = (pos >= first - s / 2.0) & (pos < first + (count - 1) * s + s / 2.0)
        return np.where(inside, np.clip(idx, 0, count - 1), -1)

    return axis(grid_.height, grid_.rows), axis(grid_.width, grid_.cols)


#: A map whose range is below this share of its largest value is called nearly flat on the figure
#: (jet would otherwise stretch noise such as 0.00226–0.00237 over its whole range).
FLAT = 0.05


def _spread(values: np.ndarray, rows: np.ndarray, cols: np.ndarray, blank) -> np.ndarray:
    """A ``[rows, cols, 3]`` colour map laid out over the input pixels."""
    out = values[np.clip(rows, 0, None)][:, np.clip(cols, 0, None)]
    mask = (rows[:, None] < 0) | (cols[None, :] < 0)
    out[mask] = blank
    return out


def figure(
    image: np.ndarray,
    grid_,
    prob: np.ndarray,
    feature: np.ndarray,
    labels: np.ndarray,
    names: Sequence[str],
    target: int,
    layer: str,
    channel: int,
    fill_rgb: Sequence[float],
    projection: np.ndarray | None,
    title: str,
    rule: tuple[str, str] | None = None,
    approx: dict | None = None,
) -> np.ndarray:
    """The row of Fig. 7 for one image as an RGB float array ``[H, W, 3]``. ``approx``: this
    image's ``--approx`` record; (b), (d) and (e) then say they are approximate, and (d) states
    the check's SSIM against its target (in red when it misses)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    image = np.asarray(image, dtype=np.float64)
    rows, cols = cells_to_pixels(grid_)
    inside = (rows[:, None] >= 0) & (cols[None, :] >= 0)

    # (a) the square where the target suffers most, painted as the model saw it
    a = image.copy()
    worst = int(np.argmin(prob))
    x0, y0, x1, y1 = (int(v) for v in grid_.boxes()[worst])
    a[y0:y1, x0:x1] = np.asarray(fill_rgb, dtype=np.float64)
    a[y0:y1, [x0, x1 - 1]] = 0.0
    a[[y0, y1 - 1], x0:x1] = 0.0

    # (b) total activity of the feature map, jet
    b = _spread(colormap(feature, "jet"), rows, cols, _BLANK)

    # (d) probability of the target over the image
    d_map = _spread(colormap(prob, "jet"), rows, cols, 0.0)
    d = np.where(inside[..., None], 0.35 * image + 0.65 * d_map, image)

    # (e) most probable class
    colors = label_colors(labels, first=target)
    classes = list(colors)
    palette = np.asarray([colors[c] for c in classes])
    index = np.vectorize({c: i for i, c in enumerate(classes)}.get)(labels)
    e = _spread(palette[index], rows, cols, _BLANK)

    tiles = [a, b] + ([projection] if projection is not None else []) + [d, e]
    approx_tag = " (approx.)" if approx else ""
    titles = [f"(a) {title}", f"(b) {layer} map {channel}: total activity{approx_tag}"]
    if projection is not None:
        name, seeded = rule or ("deconv", layer)
        at = "" if seeded == layer else f"\nseeded at {seeded} (its input)"
        titles.append(f"(c) {name} projection of map {channel}{at}")
    d_title = f"(d) p({short_name(names[target])}) under the square"
    if approx:
        fig_ssim = approx.get("check", {}).get("ssim")
        shown_ssim = "n/a" if fig_ssim is None else f"{fig_ssim:.3f}"
        fmt = (approx.get("precision") or {}).get("format", "fp32")
        d_title += (
            f"\napprox. {fmt}: check SSIM {shown_ssim}"
            f" {'≥' if approx.get('meets_target') else '< target'} {approx.get('target_ssim')}"
        )
    titles += [d_title, f"(e) most probable class{approx_tag}"]
    d_index = 3 if projection is not None else 2
    pad = 6
    strip = grid(tiles, ncol=len(tiles), pad=pad)
    h_px, w_px = strip.shape[:2]
    dpi, top, legend_w, bottom = 100, 34, 150, 46
    fig = Figure(figsize=((w_px + legend_w) / dpi, (h_px + top + bottom) / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    total_w, total_h = w_px + legend_w, h_px + top + bottom
    ax = fig.add_axes((0.0, bottom / total_h, w_px / total_w, h_px / total_h))
    ax.imshow(strip, interpolation="nearest")
    ax.set_axis_off()
    tile_w = (w_px - pad) / len(tiles)
    missed = bool(approx) and not approx.get("meets_target")
    for i, t in enumerate(titles):
        fig.text((pad + i * tile_w + (tile_w - pad) / 2) / total_w,
                 (bottom + h_px + 6) / total_h, t, ha="center", va="bottom", fontsize=7,
                 color="#b00000" if missed and i == d_index else "black")  # fmt: skip
    if projection is not None:  # (c) has no absolute scale: say how it is drawn
        fig.text((pad + 2 * tile_w + (tile_w - pad) / 2) / total_w, 4 / total_h,
                 "each image on its own scale\n(99.5th pct of |p|); grey = 0",
                 ha="center", va="bottom", fontsize=6, color="#333333")  # fmt: skip
    # colour bars with the absolute values of (b) and (d); a nearly flat map says so
    for i, values, unit in ((1, feature, "summed activation"), (d_index, prob, "probability")):
        lo, hi = float(np.min(values)), float(np.max(values))
        cax = fig.add_axes(((pad + i * tile_w + 10) / total_w, 28 / total_h,
                            (tile_w - pad - 20) / total_w, 7 / total_h))  # fmt: skip
        sm = ScalarMappable(Normalize(lo, hi if hi > lo else lo + 1e-12), "jet")
        cb = fig.colorbar(sm, cax=cax, orientation="horizontal")
        cb.set_ticks([lo, hi])
        cb.ax.tick_params(labelsize=6, length=2, pad=1)
        cb.ax.set_xticklabels([f"{lo:.3g}", f"{hi:.3g}"])
        spread = (hi - lo) / max(abs(hi), abs(lo), 1e-12)
        note = unit
        if spread < FLAT:
            # two lines: one would run into the next panel's caption (a tile is ~48 characters)
            note = f"{unit} — nearly flat:\nrange {spread:.1%} of its value"
        fig.text((pad + i * tile_w + (tile_w - pad) / 2) / total_w, 4 / total_h, note,
                 ha="center", va="bottom", fontsize=6,
                 color="#b00000" if spread < FLAT else "#333333")  # fmt: skip
    shown = [c for c in classes if colors[c] != _OTHER]
    handles = [Patch(color=colors[c], label=short_name(names[c])[:22]) for c in shown]
    if len(shown) < len(classes):
        handles.append(Patch(color=_OTHER, label="other"))
    fig.legend(handles=handles, loc="upper left",
               bbox_to_anchor=(w_px / total_w, (bottom + h_px) / total_h),
               fontsize=7, frameon=False, title="(e) labels", title_fontsize=7)  # fmt: skip
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba(), dtype=np.float64) / 255.0
    return rgba[..., :3]
