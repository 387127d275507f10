"""The sanity probe's figures: the curves, the randomisation cascade and the cross-image grid.
Every PNG stands on its own: title, axis labels with units, colour bar, caption."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from convlens.io import atomic_path

from ._curves import auc
from ._maps import MAP_LABELS

__all__ = ["curves_figure", "cascade_figure", "images_figure"]

_CMAP = "magma"


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


#: Display scale: |map| divided by this percentile of its values and clipped to [0, 1] (pixel-level
#: maps have a few very bright pixels; the metrics use the unclipped maps).
_PCT = 99.5
_CBAR = f"|importance| / its {_PCT}th percentile (per map, clipped at 1)"


def _abs01(m: np.ndarray) -> np.ndarray:
    a = np.abs(np.asarray(m, dtype=np.float32))
    return np.clip(a / max(float(np.percentile(a, _PCT)), 1e-30), 0.0, 1.0)


def _short(path: Any, n: int = 18) -> str:
    s = Path(str(path)).name
    return s if len(s) <= n else s[: n - 1] + "…"


def _mark_empty(ax, m: np.ndarray) -> None:
    if not np.any(np.asarray(m, dtype=np.float32)):
        ax.text(0.5, 0.5, "zero everywhere", transform=ax.transAxes, ha="center", va="center",
                color="white", fontsize=7)  # fmt: skip


def curves_figure(d: dict[str, Any], path: Path, model: str) -> Path:
    """Mean deletion and insertion curves of every map (and the random reference), AUC in the
    legend."""
    fig = _figure(14.0, 4.8)
    gs = fig.add_gridspec(1, 3, width_ratios=[1, 1, 0.62])
    axes = [fig.add_subplot(gs[0, 0]), fig.add_subplot(gs[0, 1])]
    n = len(d["paths"])
    lines = []
    for ax, kind in zip(axes, ("deletion", "insertion"), strict=True):
        lines = []
        for name in [*d["names"], "random"]:
            c = d["curves"][name][kind]
            xs = np.linspace(0, 100, c.shape[1])
            style = {"color": "0.45", "linestyle": "--"} if name == "random" else {"marker": "."}
            (line,) = ax.plot(xs, c.mean(0), **style)
            lines.append(line)
        verb = "removed (set to the fill)" if kind == "deletion" else "revealed (from a blur)"
        ax.set_xlabel(f"pixels {verb}, % of the image, most important first", fontsize=9)
        ax.set_ylabel(f"p(class), softmax, mean over {n} image(s)", fontsize=9)
        better = "lower AUC is better" if kind == "deletion" else "higher AUC is better"
        ax.set_title(f"{kind.capitalize()} ({better})", fontsize=10)
        ax.set_xlim(0, 100)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    leg = fig.add_subplot(gs[0, 2])
    leg.axis("off")
    labels = [
        f"{MAP_LABELS[k]}\n   deletion {auc(d['curves'][k]['deletion']).mean():.3f} · "
        f"insertion {auc(d['curves'][k]['insertion']).mean():.3f}"
        for k in [*d["names"], "random"]
    ]
    leg.legend(lines, labels, loc="center left", fontsize=8, title="map: AUC (area under p)",
               title_fontsize=8, frameon=False, labelspacing=0.9)  # fmt: skip
    fig.suptitle(
        f"Deletion and insertion curves (Petsiuk et al. 2018) · {model} · {d['steps']} steps",
        fontsize=11,
    )
    fig.tight_layout()
    return _save(fig, path)


def cascade_figure(d: dict[str, Any], path: Path, model: str, preprocess) -> Path:
    """The randomisation cascade for the first image: a row per step (the trained model first),
    a column per map, Spearman/SSIM against the trained map in each cell; below, the mean
    Spearman of every map against the step."""
    casc = d["cascade"]
    names, plan = d["names"], casc["plan"]
    rows, cols = len(plan) + 1, len(names) + 1
    fig = _figure(1.75 * cols + 1.4, 1.75 * rows + 2.6)
    gs = fig.add_gridspec(rows + 1, cols + 1, height_ratios=[1] * rows + [1.6],
                          width_ratios=[1] * cols + [0.06])  # fmt: skip
    image = preprocess.denormalize(d["inputs"][0]).permute(1, 2, 0).numpy()
    im = None
    for r in range(rows):
        ax = fig.add_subplot(gs[r, 0])
        ax.imshow(image)
        ax.set_xticks([])
        ax.set_yticks([])
        if r == 0:
            ax.set_ylabel("trained model", fontsize=8)
            ax.set_title("image", fontsize=8)
        else:
            b = plan[r - 1]
            ax.set_ylabel(f"step {r}: top {len(b)} of\n{len(casc['blocks'])} blocks random\n"
                          f"(down to {b[-1].name})", fontsize=7)  # fmt: skip
        for c, n in enumerate(names):
            ax = fig.add_subplot(gs[r, c + 1])
            m = d["maps"][n][0] if r == 0 else casc["maps"][n][r - 1, 0]
            im = ax.imshow(_abs01(m), cmap=_CMAP, vmin=0, vmax=1)
            _mark_empty(ax, m)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(MAP_LABELS[n].replace(" (", "\n("), fontsize=7)
            else:
                ax.set_xlabel(f"ρ {casc['spearman'][n][r - 1, 0]:.2f} · SSIM "
                              f"{casc['ssim'][n][r - 1, 0]:.2f}", fontsize=7)  # fmt: skip
    cax = fig.add_subplot(gs[:rows, cols])
    fig.colorbar(im, cax=cax).set_label(_CBAR, fontsize=7)
    ax = fig.add_subplot(gs[rows, 1:cols])
    steps = np.arange(len(plan) + 1)
    for n in names:
        ax.plot(steps, [1.0, *casc["spearman"][n].mean(1)], marker="o", label=MAP_LABELS[n])
    ax.axhline(d["threshold"], color="0.4", linestyle=":", label="fail threshold")
    ax.set_xticks(steps)
    ax.set_xticklabels(["trained"] + [f"top {len(b)}" for b in plan], fontsize=7)
    ax.set_xlabel("blocks re-initialised (cumulative, from the output down)", fontsize=8)
    ax.set_ylabel(f"Spearman ρ vs trained\n(mean, {casc['n_images']} image(s))", fontsize=8)
    low = min(float(np.min(casc["spearman"][n].mean(1))) for n in names)
    ax.set_ylim(min(-0.1, low - 0.05), 1.05)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6, loc="lower left", ncol=2)
    name = Path(str(d["paths"][0])).name
    fig.suptitle(f"Cascading randomisation (Adebayo et al. 2018) · {model} · {name}", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def images_figure(d: dict[str, Any], path: Path, model: str, preprocess) -> Path:
    """Image dependence: a row per map, a column per image; the row label gives the map's mean
    cross-image correlation."""
    names = d["names"]
    x = d["inputs"]
    n = len(x)
    rows, cols = len(names) + 1, n
    fig = _figure(1.7 * cols + 2.4, 1.7 * rows + 0.9)
    gs = fig.add_gridspec(rows, cols + 1, width_ratios=[1] * cols + [0.07])
    names_cls = d["class_names"]
    im = None
    for i in range(n):
        ax = fig.add_subplot(gs[0, i])
        ax.imshow(preprocess.denormalize(x[i]).permute(1, 2, 0).numpy())
        ax.set_xticks([])
        ax.set_yticks([])
        label = names_cls[int(d["targets"][i])].split(",")[0]
        ax.set_title(f"{_short(d['paths'][i])}\nclass: {label[:22]}", fontsize=7)
        if i == 0:
            ax.set_ylabel("image", fontsize=8)
        for r, name in enumerate(names):
            ax = fig.add_subplot(gs[r + 1, i])
            im = ax.imshow(_abs01(d["maps"][name][i]), cmap=_CMAP, vmin=0, vmax=1)
            _mark_empty(ax, d["maps"][name][i])
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ci = d["verdicts"][name]["cross_image_correlation"]
                cis = "n/a" if ci is None else f"{ci:.2f}"
                ax.set_ylabel(f"{MAP_LABELS[name].replace(' (', chr(10) + '(')}\ncross-image r "
                              f"{cis}", fontsize=7)  # fmt: skip
    cax = fig.add_subplot(gs[1:, cols])
    fig.colorbar(im, cax=cax).set_label(_CBAR, fontsize=7)
    fig.suptitle(f"Image dependence of each map · {model} (r near 1: the same picture for "
                 "every image)", fontsize=10)  # fmt: skip
    fig.tight_layout()
    return _save(fig, path)
