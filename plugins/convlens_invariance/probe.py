"""``convlens probe invariance``: Fig. 5 of Zeiler & Fergus (2014, Section 4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from convlens.data import Preprocess, iter_images
from convlens.errors import ConvlensError
from convlens.io import atomic_path, write_json
from convlens.options import Option, parse_int_list, parse_str_list
from convlens.probe import Probe, ProbeContext, ProbeResult, ReportSection
from convlens.render.report import esc
from convlens_invariance.analysis import InvarianceResult, invariance, translation_growth
from convlens_invariance.transforms import CANVAS, TRANSFORMS, UNITS, amounts_for

__all__ = ["InvarianceProbe", "result_json", "plot_transform"]

_TITLES = {"translate": "vertical translation", "scale": "scale", "rotate": "rotation"}
_XLABELS = {
    "translate": "vertical shift (px, + = down)",
    "scale": "scale factor",
    "rotate": "rotation (degrees, counter-clockwise)",
}


def _class_name(model: Any, idx: int) -> str:
    names = getattr(getattr(model, "convlens_info", None), "class_names", None)
    return names[idx] if names and 0 <= idx < len(names) else f"class {idx}"


def result_json(res: InvarianceResult, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``invariance.json`` document (schema in docs/probes/invariance.md)."""
    growth = translation_growth(res)
    return {
        "paper": "Zeiler & Fergus 2014, Section 4, Fig. 5",
        **(extra or {}),
        "layers": res.layers,
        "canvas": res.canvas,
        "input_size": list(res.preprocess.input_size),
        "preprocess": res.preprocess.to_dict(),
        "label_source": res.label_source,
        "transforms": {
            kind: {"amounts": res.amounts[kind], "unit": UNITS[kind]} for kind in res.curves
        },
        "images": [
            {
                "name": res.names[i],
                "label": res.labels[i],
                "prob_untransformed": res.base_probs[i],
                "curves": {
                    kind: {
                        "distance": res.curves[kind][i]["distance"],
                        "prob": res.curves[kind][i]["prob"],
                    }
                    for kind in res.curves
                },
            }
            for i in range(len(res.names))
        ],
        "translation_growth": growth,
    }


def plot_transform(res: InvarianceResult, kind: str, path: Path) -> Path:
    """One row of Fig. 5: example images, one distance panel per layer, the label probability."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    amounts = res.amounts[kind]
    n_panels = 2 + len(res.layers)
    fig = Figure(figsize=(3.2 * n_panels + 1.3, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n_panels)
    ex = res.examples.get(kind)
    ax = axes[0]
    if ex is not None and len(ex):
        pick = np.unique(np.linspace(0, len(ex) - 1, min(5, len(ex))).round().astype(int))
        imgs = res.preprocess.denormalize(ex[pick]).permute(0, 2, 3, 1).numpy()
        ax.imshow(np.concatenate(list(imgs), axis=1))
        w = imgs.shape[2]
        ax.set_xticks([w * (k + 0.5) for k in range(len(pick))])
        ax.set_xticklabels([f"{amounts[p]:g}" for p in pick], fontsize=7)
        ax.set_yticks([])
        ax.set_title(f"{res.names[0]}", fontsize=9)
    else:  # pragma: no cover - examples are always kept
        ax.axis("off")
    for k, layer in enumerate(res.layers):
        ax = axes[1 + k]
        for i, name in enumerate(res.names):
            ax.plot(amounts, res.curves[kind][i]["distance"][layer], marker=".", label=name)
        ax.set_title(f"distance at {layer}", fontsize=9)
        ax.set_xlabel(_XLABELS[kind], fontsize=8)
        ax.set_ylabel("Euclidean distance ‖f(x) − f(T x)‖₂", fontsize=7)
    ax = axes[-1]
    for i, name in enumerate(res.names):
        ax.plot(amounts, res.curves[kind][i]["prob"], marker=".", label=name)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("p(true label)", fontsize=9)
    ax.set_xlabel(_XLABELS[kind], fontsize=8)
    ax.set_ylabel("softmax probability of the label", fontsize=7)
    # beside the panels, never over a curve
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
              title="image", title_fontsize=6)  # fmt: skip
    for ax in axes[1:]:
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Fig. 5 ({_TITLES[kind]})", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


class InvarianceProbe(Probe):
    """Translate, scale and rotate each image and follow how far its feature vectors move at a
    low and a high layer, and the probability of its label (Section 4, Fig. 5)."""

    name = "invariance"
    summary = "Feature distance and label probability under translation, scale, rotation (Fig. 5)"
    paper = "Zeiler & Fergus 2014, Section 4, Fig. 5"
    options = (
        Option("transform", str, "all", "Which transform.", choices=(*TRANSFORMS, "all")),
        Option(
            "layers",
            str,
            None,
            "Comma-separated layers (default: the equivalents of ZFNet's layers 1 and 7; "
            "zfnet: conv1,fc7).",
        ),
        Option(
            "labels",
            str,
            None,
            "True class index per image, comma-separated (one value: all images). "
            "Default: each untransformed image's top-1.",
        ),
        Option(
            "steps",
            int,
            None,
            "Amounts per transform, evenly over Fig. 5's ranges (default: 7 shifts of 20 px, "
            "9 scales 0.5-1.6, 11 rotations of 35°).",
            min=2,
        ),
        Option(
            "canvas",
            str,
            "mean",
            "What fills the view beyond the photo's edges.",
            choices=tuple(CANVAS),
        ),
    )

    def run(self, ctx: ProbeContext) -> ProbeResult:
        opts = ctx.options
        kinds = list(TRANSFORMS) if opts["transform"] == "all" else [opts["transform"]]
        pre = ctx.preprocess or Preprocess.for_model(ctx.model)
        ctx.preprocess = pre
        loaded = list(iter_images(ctx.images))
        names = [p.stem for p, _ in loaded]
        labels = parse_int_list(opts["labels"], "--labels") if opts["labels"] else None
        if labels is not None:
            if len(labels) == 1:
                labels = labels * len(loaded)
            if len(labels) != len(loaded):
                raise ConvlensError(
                    f"--labels: {len(labels)} labels for {len(loaded)} images (give one per "
                    "image, or one for all)"
                )
        amounts = {k: amounts_for(k, opts["steps"]) for k in kinds}
        with ctx.progress("invariance: transformed batches", len(loaded) * len(kinds)) as advance:
            res = invariance(
                ctx.model,
                [img for _, img in loaded],
                parse_str_list(opts["layers"]) or None,
                names=names,
                transforms=kinds,
                amounts=amounts,
                labels=labels,
                canvas=opts["canvas"],
                preprocess=pre,
                device=ctx.device,
                progress=advance,
            )
        doc = result_json(
            res,
            {
                "model": ctx.model_name,
                "image_files": [str(p) for p, _ in loaded],
                "label_names": [_class_name(ctx.model, c) for c in res.labels],
            },
        )
        files = [write_json(ctx.out_dir / "invariance.json", doc)]
        growth = doc["translation_growth"]
        summary: dict[str, Any] = {
            "images": len(loaded),
            "layers": res.layers,
            "transforms": {k: len(res.amounts[k]) for k in kinds},
            "label_source": res.label_source,
        }
        if growth:
            summary["translation_growth"] = growth
            first, last = res.layers[0], res.layers[-1]
            summary["first_layer_grows_faster"] = bool(growth[first] > growth[last])
        return ProbeResult(self.name, summary=summary, files=files, data=res)

    def describe(self, result: ProbeResult) -> list[tuple[str, str]]:
        s = result.summary
        rows = [
            ("images", str(s["images"])),
            ("layers", ", ".join(s["layers"])),
            ("amounts", ", ".join(f"{k}: {n}" for k, n in s["transforms"].items())),
            ("true label", s["label_source"]),
        ]
        growth = s.get("translation_growth")
        if growth:
            rows.append(
                (
                    "translation: d(±20 px) / d(±60 px)"
                    if _default_translation(result)
                    else "translation: d(smallest) / d(largest shift)",
                    ", ".join(f"{k} {v:.2f}" for k, v in growth.items()),
                )
            )
        return rows

    def render(self, result: ProbeResult, ctx: ProbeContext) -> ReportSection | None:
        res: InvarianceResult = result.data
        figures = []
        for kind in res.curves:
            path = plot_transform(res, kind, ctx.out_dir / f"invariance_{kind}.png")
            figures.append(f"{self.name}/{path.name}")
        growth = result.summary.get("translation_growth")
        note = ""
        if growth:
            note = (
                "<p>Translation, each curve divided by its distance at the largest shift, "
                "mean over images at the smallest shift: "
                + ", ".join(f"<b>{esc(k)}</b> {v:.2f}" for k, v in growth.items())
                + " (Fig. 5: small shifts change layer 1 a lot, the top layer about linearly)."
                "</p>"
            )
        labels = ", ".join(
            f"{esc(n)}: {esc(_class_name(ctx.model, c))} ({c})"
            for n, c in zip(res.names, res.labels, strict=True)
        )
        html = (
            f"<p>{len(res.names)} images; Euclidean distance between the feature vectors of the "
            f"transformed and the original image at {esc(', '.join(res.layers))}, and the "
            f"probability of the true label ({esc(res.label_source)}: {labels}). Beyond the "
            f"photo the view is filled with <code>{esc(res.canvas)}</code>.</p>"
            + note
            + "".join(
                f'<figure><img src="{f}" alt="{esc(f)}"><figcaption>{esc(_TITLES[k])}'
                "</figcaption></figure>"
                for f, k in zip(figures, res.curves, strict=True)
            )
        )
        return ReportSection("Invariance (Section 4, Fig. 5)", html, figures=figures, order=45)


def _default_translation(result: ProbeResult) -> bool:
    res = result.data
    return isinstance(res, InvarianceResult) and res.amounts.get("translate") == list(
        amounts_for("translate")
    )
