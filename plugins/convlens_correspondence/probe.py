"""``convlens probe correspondence``: Table 1 and Fig. 8 of Zeiler & Fergus (2014, Section 4.3)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from convlens.data import Preprocess, default_images
from convlens.errors import ConvlensError, ImageError
from convlens.io import save_npz, write_json
from convlens.options import Option, parse_str_list
from convlens.probe import Probe, ProbeContext, ProbeResult, ReportSection
from convlens.render.report import esc
from convlens_correspondence.analysis import (
    NORMALISATION,
    RANDOM,
    CorrespondenceResult,
    correspondence,
    draw_count,
)
from convlens_correspondence.parts import embedded_faces, read_parts

__all__ = ["CorrespondenceProbe", "result_json"]

_RANDOM_COLUMNS = 3  # random draws shown in the Fig. 8 render


def _label(name: str) -> str:
    return name.replace("_", " ")


def _spread_note(res: CorrespondenceResult) -> str:
    """What the ± of each kind of row is taken over, in words."""
    notes = []
    for kind, label in (("part", "parts"), ("random", "random")):
        rows = [r for r in res.rows if r.kind == kind]
        if not rows:
            continue
        if rows[0].std_over == "draws":
            notes.append(f"{label}: std over {len(rows[0].draws)} draws")
        else:
            n = len(rows[0].images)
            notes.append(f"{label}: std over {n * (n - 1) // 2} image pairs")
    return "; ".join(notes)


def _is_default_images(images: list[Path]) -> bool:
    """Whether ``images`` are the bundled photos the runner substitutes when none are given."""
    try:
        defaults = [p.resolve() for p in default_images()]
    except (ConvlensError, ImageError):
        return False
    return [Path(p).resolve() for p in images] == defaults


def result_json(res: CorrespondenceResult, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``correspondence.json`` document (schema in docs/probes/correspondence.md)."""
    probs = res.logits.softmax(-1) if res.logits.dim() == 2 and res.logits.shape[1] > 1 else None
    images = []
    for i, it in enumerate(res.items):
        entry: dict[str, Any] = {
            "index": i,
            "name": it.name,
            "source": it.source,
            "size": list(it.size),
            "parts": {
                part: {
                    "image_box": list(it.parts[part]),
                    "input_box": list(res.input_boxes[i][part][0]),
                    "clipped": bool(res.input_boxes[i][part][1]),
                }
                for part in it.parts
            },
            "object": None
            if it.object_box is None
            else {"image_box": list(it.object_box), "input_box": list(res.object_boxes[i])},
        }
        if probs is not None:
            entry["top1"] = int(probs[i].argmax())
            entry["top1_prob"] = float(probs[i].max())
        images.append(entry)
    rows = []
    for row in res.rows:
        rows.append(
            {
                "name": row.name,
                "kind": row.kind,
                "images": row.images,
                "std_over": row.std_over,
                "draws": [[None if b is None else list(b) for b in boxes] for boxes in row.draws],
                "layers": {
                    layer: {
                        "mean": row.stat(layer)[0],
                        "std": row.stat(layer)[1],
                        "values": [s["value"] for s in row.scores[layer]],
                        "raw": [s["raw"] for s in row.scores[layer]],
                        "pair_std": [s["pair_std"] for s in row.scores[layer]],
                        "pairs": [s["pairs"] for s in row.scores[layer]],
                    }
                    for layer in res.layers
                },
            }
        )
    return {
        "paper": "Zeiler & Fergus 2014, Section 4.3, Table 1, Fig. 8",
        **(extra or {}),
        "layers": res.layers,
        "units": res.units,
        "input_size": list(res.preprocess.input_size),
        "preprocess": res.preprocess.to_dict(),
        "fill": {"rgb01": res.fill_rgb01, "model_space": list(res.fill)},
        "normalisation": NORMALISATION,
        "std": "population std (ddof=0): over draws when a row has several, else over the "
        "N (N-1) / 2 unordered image pairs of its single draw",
        "seed": res.seed,
        "rng": "numpy.random.default_rng(seed) for random positions, "
        "default_rng([seed, 1]) for jitter",
        "random_draws": res.random,
        "jitter": res.jitter,
        "images": images,
        "rows": rows,
        "table": {
            name: {layer: {"mean": m, "std": s} for layer, (m, s) in cells.items()}
            for name, cells in res.table().items()
        },
    }


class CorrespondenceProbe(Probe):
    """Mask the same part in every image and measure how consistently the features change
    (Section 4.3): a low Delta for eyes and nose next to random masks means the model treats the
    same part alike across images — an implicit correspondence."""

    name = "correspondence"
    summary = "Mask the same part in every image: do features change consistently? (Table 1)"
    paper = "Zeiler & Fergus 2014, Section 4.3, Table 1, Fig. 8"
    options = (
        Option(
            "layers",
            str,
            None,
            "Comma-separated layers (default: the equivalents of ZFNet's layers 5 and 7; "
            "zfnet: conv5,fc7).",
        ),
        Option(
            "parts",
            Path,
            None,
            "parts.json: image → part → box (x0, y0, x1, y1) in that image's pixels ('object' bounds "
            "the random masks). Default: five embedded LFW faces with eyes and nose boxed.",
        ),
        Option("random", int, 10, "Draws of the random-mask baseline (0: none).", min=0),
        Option(
            "jitter",
            float,
            0.0,
            "Also draw the part masks --random times, shifted by up to this fraction of their "
            "size (± then over draws; 0: exact boxes, ± over image pairs).",
            min=0,
            max=1,
        ),
        Option("fill", float, 0.5, "Grey level of the masks, in [0, 1] RGB.", min=0, max=1),
    )

    def run(self, ctx: ProbeContext) -> ProbeResult:
        opts = ctx.options
        default = _is_default_images(ctx.images)
        if opts["parts"] is None:
            if not default:
                raise ConvlensError(
                    "correspondence: --images needs --parts PARTS.json (the boxes of the parts "
                    "to mask); with neither, the embedded LFW faces are used"
                )
            items, dataset, parts_file = embedded_faces(), "embedded LFW faces", None
        else:
            items = read_parts(opts["parts"], None if default else list(ctx.images))
            dataset, parts_file = "parts file", str(opts["parts"])
        if not 0.0 <= opts["fill"] <= 1.0:
            raise ConvlensError(f"--fill {opts['fill']}: must lie in [0, 1]")
        pre = ctx.preprocess or Preprocess.for_model(ctx.model)
        ctx.preprocess = pre
        layers = parse_str_list(opts["layers"]) or None
        total = draw_count(items, opts["random"], opts["jitter"])
        with ctx.progress("correspondence: masked passes", total) as advance:
            res = correspondence(
                ctx.model,
                items,
                layers,
                preprocess=pre,
                random=opts["random"],
                jitter=opts["jitter"],
                fill=opts["fill"],
                seed=ctx.seed,
                device=ctx.device,
                progress=advance,
            )
        doc = result_json(
            res, {"model": ctx.model_name, "dataset": dataset, "parts_file": parts_file}
        )
        files = [
            write_json(ctx.out_dir / "correspondence.json", doc),
            save_npz(
                ctx.out_dir / "correspondence.npz",
                inputs=res.inputs.numpy().astype(np.float32),
                fill=np.asarray(res.fill, dtype=np.float32),
            ),
        ]
        summary: dict[str, Any] = {
            "dataset": dataset,
            "images": len(items),
            "layers": res.layers,
            "seed": ctx.seed,
            "random_draws": res.random,
            "table": doc["table"],
        }
        return ProbeResult(self.name, summary=summary, files=files, data=res)

    # -- output -------------------------------------------------------------------------------
    def describe(self, result: ProbeResult) -> list[tuple[str, str]]:
        """Table 1: one line per occlusion location, ``mean ± std`` per layer."""
        s = result.summary
        layers = s["layers"]
        rows = [("occlusion location", " | ".join(layers))]
        for name, cells in s["table"].items():
            rows.append(
                (
                    _label(name),
                    " | ".join(
                        f"{cells[lay]['mean']:.3f} ± {cells[lay]['std']:.3f}" for lay in layers
                    ),
                )
            )
        res = result.data
        if isinstance(res, CorrespondenceResult):
            rows.append(("±", _spread_note(res)))
        rows.append(("Δ", "fraction of differing signs of x − x̃, averaged over image pairs"))
        rows.append(("images", f"{s['images']} ({s['dataset']})"))
        return rows

    def render(self, result: ProbeResult, ctx: ProbeContext) -> ReportSection | None:
        res: CorrespondenceResult = result.data
        figure = self._figure(
            res,
            ctx.out_dir / "correspondence.png",
            ctx.model_name,
            result.summary.get("dataset", ""),
        )
        head = "".join(f"<th>{esc(layer)}</th>" for layer in res.layers)
        body = ""
        for row in res.rows:
            cells = "".join(
                f"<td>{m:.3f} ± {s:.3f}</td>" for m, s in (row.stat(lay) for lay in res.layers)
            )
            body += f"<tr><td>{esc(_label(row.name))}</td>{cells}</tr>"
        parts = [r.name for r in res.rows if r.kind == "part"]
        shown = min(_RANDOM_COLUMNS, len(next((r.draws for r in res.rows if r.name == RANDOM), [])))
        html = (
            f"<p>{esc(result.summary['dataset'])}: {len(res.items)} images. Each part is masked "
            f"with a grey box (level {res.fill_rgb01:g}) in every image; Δ is the fraction of "
            "units whose sign of the feature change x − x̃ differs between two images, averaged "
            "over image pairs (lower: the part changes the features more consistently). "
            f"Random: {res.random} draws of masks of the same sizes at random positions.</p>"
            f"<table><tr><th>occlusion location</th>{head}</tr>{body}</table>"
            f'<figure><img src="{self.name}/{figure.name}" alt="masked images">'
            f"<figcaption>Fig. 8 style. Columns: original, "
            + ", ".join(esc(_label(p)) for p in parts)
            + (f", {shown} random draws" if shown else "")
            + ".</figcaption></figure>"
        )
        return ReportSection(
            "Correspondence (Section 4.3, Table 1)",
            html,
            figures=[f"{self.name}/{figure.name}"],
            order=40,
        )

    @staticmethod
    def _figure(res: CorrespondenceResult, path: Path, model: str = "", dataset: str = "") -> Path:
        """Fig. 8 with its column headers (original / each part / random draws) and, under each,
        the Δ of that mask at every layer (mean ± std, lower: more consistent), so the PNG
        carries Table 1 with it."""
        from convlens.render.canvas import Canvas

        columns: list[tuple[Any, int]] = [(None, 0)]
        columns += [(r, 0) for r in res.rows if r.kind == "part"]
        for r in res.rows:
            if r.name == RANDOM:
                columns += [(r, d) for d in range(min(_RANDOM_COLUMNS, len(r.draws)))]
        shown = {id(r): {} for r, _ in columns if r is not None}
        for r, d in columns:
            if r is not None:
                shown[id(r)][d] = res.preprocess.denormalize(res.masked(r, d))
        base = res.preprocess.denormalize(res.inputs)
        h, w = res.inputs.shape[-2:]
        scale = min(1.0, 120 / max(h, w))
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        layers = res.layers[:4]
        pad, margin = 4, 10
        head = 16 + 11 * len(layers)
        width = max(margin * 2 + len(columns) * (size[0] + pad), 520)
        canvas = Canvas(width, head + len(res.items) * (size[1] + pad) + margin)
        canvas.title(f"Fig. 8 · correspondence{f' · {model}' if model else ''}: parts masked "
                     f"in {len(res.items)} images{f' ({dataset})' if dataset else ''}")  # fmt: skip
        canvas.title(
            "under each column: Δ of that mask at each layer named under 'original' (mean ± std; "
            "lower = the part changes the features more consistently across images)",
            size=7.5,
            weight="normal",
        )
        for k, (r, d) in enumerate(columns):
            cx = margin + k * (size[0] + pad) + size[0] / 2
            if r is None:
                label, stats = "original", None
            elif r.name == RANDOM:
                label, stats = f"random #{d + 1}", (r if d == 0 else None)
            else:
                label, stats = _label(r.name), r
            canvas.text(cx, 0, label, size=7, ha="center", weight="bold")
            for j, lay in enumerate(layers):
                if r is None:  # the original's column names the layers of the rows of values
                    text = f"Δ at {lay}" if len(lay) <= 22 else f"Δ at …{lay[-20:]}"
                elif stats is None:
                    text = "(as #1)" if j == 0 else ""
                else:
                    m, sd = stats.stat(lay)
                    text = f"{m:.3f} ± {sd:.3f}"
                canvas.text(cx, 14 + 11 * j, text, size=6, ha="center",
                            color="#333333" if r is not None else "#000000")  # fmt: skip
        for i in range(len(res.items)):
            y = head + i * (size[1] + pad)
            for k, (r, d) in enumerate(columns):
                img = base[i] if r is None else shown[id(r)][d][i]
                arr = (img.permute(1, 2, 0).numpy() * 255 + 0.5).clip(0, 255).astype(np.uint8)
                tile = Image.fromarray(arr).resize(size, Image.Resampling.BILINEAR)
                canvas.paste(np.asarray(tile) / 255.0, margin + k * (size[0] + pad), y)
        canvas.caption(
            "Δ: " + NORMALISATION + ". Masks: grey boxes (level "
            f"{res.fill_rgb01:g}) over each part; random: boxes of the same sizes at random "
            f"positions ({res.random} draws; the first {min(_RANDOM_COLUMNS, res.random)} shown)."
        )
        return canvas.save(path)
