"""``convlens probe occlusion``: occlusion sensitivity, Zeiler & Fergus 2014, Section 4.2, Fig. 7.

A grey square slides over each image; at every position the probe records the probability of the
correct class (Fig. 7 (d)), the most probable class ((e)) and the total activity of the strongest
feature map of the top convolutional layer ((b)), renders Fig. 7's panels (with (c), the deconv
projection of that map, when the deconv probe is installed) and writes ``occlusion.json`` and
``occlusion.npz`` (schema in ``docs/probes/occlusion.md``).
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

import convlens
from convlens.errors import ConvlensError
from convlens.io import save_npz, write_json
from convlens.probe import ProbeContext, ProbeResult, ReportSection
from convlens.render import save_png
from convlens.render.report import esc

from ._approx import CHECK, COARSE, DRILL, DRILL_BF16, TRUNCATE
from ._cache import entry_for
from ._compute import METHODS, OcclusionMaps, occlusion_maps
from ._grid import OcclusionGrid, default_window
from ._precision import PRECISIONS
from ._render import figure, short_name

__all__ = ["OcclusionProbe", "auto_stride", "parse_fill", "class_names", "POSITION_BUDGET"]

#: The default stride is the finest of 8, 16 or 32 px (at 224) that keeps images × positions
#: within this many forward-equivalents (two images at Fig. 7's 32 px / 8 px sweep).
POSITION_BUDGET = 1250


def auto_stride(n_images: int, height: int, width: int, window: int) -> int:
    """The default stride: Fig. 7's 8 px (at 224) when the sweep stays within
    :data:`POSITION_BUDGET` positions over all images, else 16 px, else 32 px (never more than the
    window, so that every pixel is covered)."""
    side = min(height, width)
    stride = default_window(side, 32)
    for ref in (8, 16, 32):
        stride = min(default_window(side, ref), window)
        if n_images * len(OcclusionGrid(height, width, window, stride)) <= POSITION_BUDGET:
            break
    return stride


def parse_fill(text: str | None, mean: tuple[float, float, float]) -> tuple[tuple[float, ...], str]:
    """``--fill``: ``mean`` (the dataset mean pixel, default), ``grey`` (0.5), one number or three
    comma-separated numbers in [0, 1] RGB. Returns the RGB colour and how it was given."""
    spec = (text or "mean").strip().lower()
    if spec == "mean":
        return tuple(float(v) for v in mean), "dataset mean pixel"
    if spec in ("grey", "gray"):
        return (0.5, 0.5, 0.5), "grey (0.5)"
    try:
        values = tuple(float(v) for v in spec.split(","))
    except ValueError:
        raise ConvlensError(
            f"option --fill {text!r}: expected mean, grey, a number or R,G,B in [0, 1]"
        ) from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or not all(0.0 <= v <= 1.0 for v in values):
        raise ConvlensError(f"option --fill {text!r}: expected one or three numbers in [0, 1]")
    return values, "given"


def class_names(model: torch.nn.Module, num_classes: int) -> list[str]:
    """The model's class names (``convlens_info.class_names``); ImageNet's (timm's
    ``ImageNetInfo``) for a 1000-way model without its own; else ``class k``."""
    info = getattr(model, "convlens_info", None)
    names = list(getattr(info, "class_names", None) or [])
    if len(names) == num_classes:
        return [str(n) for n in names]
    if num_classes == 1000:
        from convlens.models import imagenet_class_names

        return list(imagenet_class_names())
    return [f"class {k}" for k in range(num_classes)]


class OcclusionProbe(convlens.Probe):
    """Occlusion sensitivity maps (Fig. 7): class probability, label and feature activity as
    functions of where a grey square covers the image."""

    name = "occlusion"
    summary = "Occlusion sensitivity: class probability, label and feature map activity per square"
    paper = "Section 4.2, Fig. 7"
    options = (
        convlens.Option("window", int, None, "Square side in input pixels (default 32 at 224).", min=1),
        convlens.Option(
            "stride", int, None,
            "Step in input pixels (default 8 at 224, or 16/32 when images x positions would "
            f"exceed {POSITION_BUDGET}).", min=1,
        ),
        convlens.Option("fill", str, "mean",
                        "Square colour: mean (dataset mean pixel), grey, v or R,G,B in [0, 1]."),
        convlens.Option("target", int, None, "Class whose probability is mapped (default: each "
                        "image's unoccluded top-1).", min=0),
        convlens.Option("layer", str, None, "Layer of panel (b) (default: the top conv layer)."),
        convlens.Option("channel", int, None, "Feature map of panel (b) (default: the strongest "
                        "in each unoccluded image).", min=0),
        convlens.Option("method", str, "auto", "auto: incremental where supported, else batched.",
                        choices=METHODS),
        convlens.Option("batch_size", int, None, "Positions per forward (default: by memory).", min=1),
        convlens.Option("threads", int, None, "Intra-op threads during the sweep (default: "
                        "torch's or one, whichever runs the first batches faster).", min=1),
        convlens.Option("full_above", float, 0.7, "Incremental path: run a layer in full once "
                        "the changed region exceeds this fraction of its map.", min=0, max=1),
        convlens.Option("approx", bool, False, "Approximate map (Krypton's adaptive drill-down) "
                        "with its SSIM against exact values on a random block of positions."),
        convlens.Option("approx_coarse", int, COARSE, "--approx: computed on every k-th row and "
                        "column of positions.", min=2, max=64),
        convlens.Option("approx_drill", float, None, "--approx: share of positions computed "
                        f"again where the map changes most (default: {DRILL_BF16:g} in bf16, "
                        f"{DRILL:g} in fp32).", min=0, max=1),
        convlens.Option("approx_ssim", float, 0.9, "--approx: target SSIM; a map below it is "
                        "reported as missing it.", min=0, max=1),
        convlens.Option("approx_check", float, CHECK, "--approx: share of positions in the "
                        "random 7x7 blocks computed exactly to measure the SSIM.", min=0.01,
                        max=1),
        convlens.Option("approx_truncate", float, TRUNCATE, "--approx: projective-field "
                        "threshold tau in (0, 1] of the coarse and drill-down positions (each "
                        "layer's changed region capped at tau of its map; 1 = exact).", min=0.01, max=1),
        convlens.Option("approx_precision", str, "auto", "--approx: number format of the "
                        "coarse and drill-down positions (auto: bf16 where the CPU or GPU runs "
                        "it natively, else fp32; the check blocks are always exact fp32).",
                        choices=PRECISIONS),
    )  # fmt: skip

    # -- run ------------------------------------------------------------------------------------

    def run(self, ctx: ProbeContext) -> ProbeResult:
        opts = ctx.options
        x, paths = ctx.inputs()
        pre = ctx.preprocess
        height, width = int(x.shape[-2]), int(x.shape[-1])
        window = opts["window"] or default_window(min(height, width))
        stride = opts["stride"] or auto_stride(len(paths), height, width, window)
        grid = OcclusionGrid(height, width, int(window), int(stride))
        fill_rgb, fill_how = parse_fill(opts["fill"], pre.mean)
        fill_model = pre.to_model_space(fill_rgb)
        with ctx.progress("occlusion", len(paths) * len(grid)) as advance:
            res = occlusion_maps(
                ctx.model, x.to(ctx.device), window=grid.window, stride=grid.stride,
                fill=fill_model, target=opts["target"], layer=opts["layer"],
                channel=opts["channel"], method=opts["method"], batch_size=opts["batch_size"],
                full_above=opts["full_above"], threads=opts["threads"], progress=advance,
                approx=bool(opts["approx"]), approx_coarse=opts["approx_coarse"],
                approx_drill=opts["approx_drill"], approx_ssim=opts["approx_ssim"],
                approx_check=opts["approx_check"], approx_truncate=opts["approx_truncate"],
                approx_precision=opts["approx_precision"], approx_seed=ctx.seed,
            )  # fmt: skip
        names = class_names(ctx.model, res.num_classes)
        t_write = time.perf_counter()
        files = self._write(ctx, res, x, paths, names, fill_rgb, fill_how)
        res.phases["write"] = round(time.perf_counter() - t_write, 4)
        summary = self._summary(res, paths, names, fill_rgb, fill_how)
        data = {
            "maps": res,
            "inputs": x.cpu(),
            "paths": paths,
            "names": names,
            "fill_rgb": fill_rgb,
        }
        return ProbeResult(self.name, summary=summary, files=files, data=data)

    def _write(self, ctx, res: OcclusionMaps, x, paths, names, fill_rgb, fill_how) -> list[Path]:
        out = ctx.out_dir
        npz = save_npz(
            out / "occlusion.npz",
            prob_target=res.prob_target,
            feature_activity=res.feature_activity,
            top_class=res.top_class,
            inputs=x.detach().cpu().float().numpy(),
            logit_target=res.logit_target,
            boxes=res.grid.boxes(),
            targets=res.targets,
            channels=res.channels,
            prob_orig=res.prob_orig,
            logit_orig=res.logit_orig,
            feature_orig=res.feature_orig,
            fill_model_space=np.asarray(res.fill, dtype=np.float32),
        )
        per_image = []
        for i, p in enumerate(paths):
            drop = _worst(res, i)
            per_image.append({
                "image": str(p),
                "target": int(res.targets[i]),
                "target_name": names[int(res.targets[i])],
                "prob_orig": float(res.prob_orig[i]),
                "logit_orig": float(res.logit_orig[i]),
                "top1_orig": int(res.top1_orig[i]),
                "top1_orig_name": names[int(res.top1_orig[i])],
                "channel": int(res.channels[i]),
                "feature_orig": float(res.feature_orig[i]),
                "min_prob": drop["min_prob"],
                "min_prob_at": drop["at"],
                "min_prob_box": drop["box"],
                "feature_min": float(res.feature_activity[i].min()),
                "feature_min_at": list(np.unravel_index(int(res.feature_activity[i].argmin()),
                                                        res.grid.shape)),
                "labels": sorted({int(c) for c in np.unique(res.top_class[i])}),
            })  # fmt: skip
        used = sorted({int(c) for c in np.unique(res.top_class)} | set(res.targets.tolist()))
        js = write_json(
            out / "occlusion.json",
            {
                "probe": self.name,
                "paper": self.paper,
                "model": ctx.model_name,
                "seed": ctx.seed,
                "images": [str(p) for p in paths],
                "input_size": [res.grid.height, res.grid.width],
                "grid": res.grid.to_dict(),
                "fill": {
                    "given": ctx.options["fill"],
                    "meaning": fill_how,
                    "rgb01": list(fill_rgb),
                    "model_space": list(res.fill),
                },
                "target": {"given": ctx.options["target"], "source": res.target_source},
                "layer": res.layer,
                "layer_module": res.layer_module,
                "channel": {"given": ctx.options["channel"], "source": res.channel_source},
                "per_image": per_image,
                "class_names": {str(c): names[c] for c in used},
                "path": res.path,
                "seconds": round(res.seconds, 3),
                "phases": res.phases,
                "arrays": {
                    "file": "occlusion.npz",
                    "prob_target": "float32 [N, rows, cols]: p(target) with the square there",
                    "feature_activity": "float64 [N, rows, cols]: spatial sum of the channel",
                    "top_class": "int64 [N, rows, cols]: most probable class",
                    "inputs": "float32 [N, 3, H, W]: the preprocessed model inputs",
                },
            },
        )
        return [js, npz]

    def _summary(self, res: OcclusionMaps, paths, names, fill_rgb, fill_how) -> dict[str, Any]:
        g = res.grid
        out: dict[str, Any] = {
            "images": len(paths),
            "grid": f"{g.rows}x{g.cols} positions, square {g.window} px, stride {g.stride} px "
            f"(input {g.height}x{g.width})",
            "fill": f"{fill_how} rgb {tuple(round(v, 3) for v in fill_rgb)} -> model "
            f"{tuple(round(v, 3) for v in res.fill)}",
            "layer": f"{res.layer} ({res.channel_source} channel)",
            "path": describe_path(res.path),
            **({"approx": describe_approx(res.path["approx"])} if res.path.get("approx") else {}),
            "threads": ", ".join(f"{k} {v['threads']}" for k, v in res.path["threads"].items()),
            "seconds": round(res.seconds, 2),
        }
        for i, p in enumerate(paths):
            drop = _worst(res, i)
            t = int(res.targets[i])
            out[Path(p).name] = (
                f"{short_name(names[t])} ({t}) p={res.prob_orig[i]:.3g} -> min "
                f"{drop['min_prob']:.3g} at box {drop['box']}"
            )
        return out

    # -- render ---------------------------------------------------------------------------------

    def render(self, result: ProbeResult, ctx: ProbeContext) -> ReportSection | None:
        d = result.data
        res: OcclusionMaps = d["maps"]
        x, paths, names = d["inputs"], d["paths"], d["names"]
        pre = ctx.preprocess
        figures, rows = [], []
        t0 = time.perf_counter()
        projections, note, rule = _deconv_projections(ctx, x, res)  # rule: (name, layer)
        t1 = time.perf_counter()
        approx_records = (res.path.get("approx") or {}).get("per_image") or [None] * len(paths)
        for i, p in enumerate(paths):
            image = pre.denormalize(x[i]).permute(1, 2, 0).numpy()
            proj = None if projections is None else projections[i]
            arr = figure(
                image, res.grid, res.prob_target[i], res.feature_activity[i], res.top_class[i],
                names, int(res.targets[i]), res.layer, int(res.channels[i]), d["fill_rgb"],
                proj, Path(p).name, rule,
                approx=approx_records[i],
            )  # fmt: skip
            fname = f"occlusion_{i:02d}_{Path(p).stem}.png"
            save_png(arr, ctx.out_dir / fname)
            figures.append(f"{self.name}/{fname}")
            drop = _worst(res, i)
            t = int(res.targets[i])
            rows.append(
                f"<tr><td>{esc(Path(p).name)}</td><td>{esc(short_name(names[t]))} ({t})</td>"
                f"<td>{res.prob_orig[i]:.3f}</td><td>{drop['min_prob']:.3f}</td>"
                f"<td>{esc(drop['box'])}</td><td>{len(np.unique(res.top_class[i]))}</td></tr>"
            )
        g = res.grid
        html = (
            "<p>A square of the dataset-mean colour slides over each image "
            f"({g.window} px, stride {g.stride} px, {g.rows}&times;{g.cols} positions). "
            "Panels: (a) the image with the square where the correct class suffers most; "
            f"(b) total activity of one feature map of <code>{esc(res.layer)}</code> (the "
            "strongest in the unoccluded image) as a function of the square's position; "
            + (
                "(c) that map projected to pixels by the deconv probe; "
                if projections is not None
                else ""
            )
            + "(d) probability of the correct class; (e) the most probable class, with its "
            "legend. Zeiler &amp; Fergus 2014, Section 4.2, Fig. 7.</p>"
            + (f'<p class="meta">Panel (c) omitted: {esc(note)}</p>' if note else "")
            + f"<p>Computed by <b>{esc(describe_path(res.path))}</b> in {res.seconds:.1f} s.</p>"
            + _approx_html(res.path.get("approx"))
            + "<table><tr><th>image</th><th>class</th><th>p unoccluded</th><th>min p</th>"
            "<th>square of min p (x0, y0, x1, y1)</th><th>labels in (e)</th></tr>"
            + "".join(rows)
            + "</table>"
            + "".join(f'<figure><img src="{esc(f)}" alt="occlusion"></figure>' for f in figures)
        )
        _record_phases(
            ctx.out_dir / "occlusion.json",
            write=res.phases.get("write", 0.0),
            deconv_panel=t1 - t0,
            figures=time.perf_counter() - t1,
        )
        return ReportSection("Occlusion sensitivity (Fig. 7)", html, figures, order=40)

    def describe(self, result: ProbeResult) -> list[tuple[str, str]]:
        return [(k, str(v)) for k, v in result.summary.items()]


def _record_phases(path: Path, **seconds: float) -> None:
    """Add the seconds of the phases after the computation (writing the files, panel (c) from
    the deconv probe, the figures and report section) to ``phases`` in ``occlusion.json``."""
    if not path.exists():
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    phases = data.setdefault("phases", {})
    phases.update({k: round(v, 4) for k, v in seconds.items()})
    write_json(path, data)


def _worst(res: OcclusionMaps, i: int) -> dict[str, Any]:
    p = int(np.argmin(res.prob_target[i]))
    r, c = divmod(p, res.grid.cols)
    return {
        "min_prob": float(res.prob_target[i].reshape(-1)[p]),
        "at": [r, c],
        "box": [int(v) for v in res.grid.boxes()[p]],
    }


def _approx_html(approx: dict[str, Any] | None) -> str:
    """The report's paragraph on an approximate map (red when it misses its target)."""
    if not approx:
        return ""
    style = "" if approx["meets_target"] else ' style="color:#b00000"'
    return f"<p{style}>The maps are <b>{esc(describe_approx(approx))}</b>.</p>"


def describe_approx(approx: dict[str, Any]) -> str:
    """One line: how good the approximate map is, and whether it meets its target."""
    per = approx["per_image"]
    figs = [r["check"]["ssim"] for r in per]
    shown = ", ".join("n/a" if f is None else f"{f:.3f}" for f in figs)
    computed = sum(r["computed_positions"]["total"] for r in per)
    exact = sum(r["exact_positions"] for r in per)
    total = sum(r["positions"] for r in per)
    tau = per[0].get("truncate", 1.0)
    fmt = (per[0].get("precision") or {}).get("format", "fp32")
    verdict = (
        "meets the target"
        if approx["meets_target"]
        else "BELOW the target: not a good approximation"
    )
    return (
        "approximate (adaptive drill-down"
        + (f", projective-field truncation tau {tau:g}" if tau < 1 else "")
        + (", bfloat16 with bias correction" if fmt == "bf16" else "")
        + f"): {computed} of {total} positions computed, {exact} exactly; SSIM on the "
        f"exact check block {shown} vs target {per[0]['target_ssim']}: {verdict}"
    )


def describe_path(path: dict[str, Any]) -> str:
    """One line: which computation ran (and why, for a fallback)."""
    layers = path.get("layers") or []
    patch = [r["node"] for r in layers if r["mode"] == "patch"]
    if path.get("method") == "incremental":
        span = f" ({patch[0]} … {patch[-1]})" if patch else ""
        return (
            f"incremental inference: {len(patch)} of {len(layers)} layers on patches{span}, "
            "the rest in full"
        )
    if path.get("method") == "batched":
        why = path.get("fallback_reason")
        return "batched forwards" + (f" (incremental not supported: {why})" if why else "")
    return f"mixed per image: {', '.join(path.get('per_image', []))}"


def _deconv_projections(ctx: ProbeContext, x: torch.Tensor, res: OcclusionMaps):
    """Panel (c): the deconv probe's projection of each image's map (at its strongest unit) with
    the backward rule the deconv probe would choose (``auto``: measured image_specificity), or
    (None, why not, None). One batched call of the deconv plugin's ``project``."""
    if ctx.probes is None or "deconv" not in ctx.probes:
        return None, "the deconv probe is not installed", None
    try:
        import convlens_deconv as deconv
    except ImportError as exc:
        return None, f"the deconv probe cannot be imported ({exc})", None
    needed = ("project", "Seed", "layer_activation", "choose_rule")
    full_api = all(hasattr(deconv, a) for a in needed)
    if not full_api and not hasattr(deconv, "project_strongest"):
        return None, "the deconv probe offers no project_strongest", None
    from convlens.render import robust_stretch

    xs = x.to(ctx.device)
    if not full_api:  # the minimal contract: project_strongest, image by image, its own rule
        try:
            projections = torch.cat([
                deconv.project_strongest(ctx.model, xs[i : i + 1], res.layer,
                                         int(res.channels[i]))
                for i in range(x.shape[0])
            ])  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - another plugin's failure must not sink this
            msg = f"deconv projection failed: {type(exc).__name__}: {exc}"
            warnings.warn(f"occlusion: panel (c) omitted, {msg}", stacklevel=2)
            return None, msg, None
        arrs = [p.detach().cpu().float().numpy() for p in projections]
        return [robust_stretch(a).transpose(1, 2, 0) for a in arrs], None, None
    try:
        ref = xs
        if xs.shape[0] < 2:  # the rule check needs a few different photos
            from convlens.data import default_images, load_batch

            ref, _ = load_batch(default_images()[:4], ctx.preprocess)
            ref = ref.to(ctx.device)
        from convlens.engine import unsaturated

        # a ReLU6 output's strongest units sit at the ceiling, where guided projects zero: seed
        # the same channel at the ReLU6's input instead (the trace is the sweep's, cached)
        entry, _ = entry_for(ctx.model, xs)
        layer = unsaturated(entry.trace(ctx.model, xs[:1]), res.layer)
        # the rule depends on the model and layer, not on this run's images when it is
        # measured on the bundled photos: measured once per model (and weights) in a process,
        # and kept on disk by the deconv plugin for later processes
        key = ("deconv_rule", layer, xs.shape[0] < 2)
        choice = entry.extras.get(key) if xs.shape[0] < 2 else None
        if choice is None:
            choice = deconv.choose_rule(ctx.model, ref[:4], layer)
            if xs.shape[0] < 2:
                entry.extras[key] = choice
        fig = "n/a" if choice.figure is None else f"{choice.figure:.2f}"
        ctx.note(f"occlusion panel (c) at {layer}: rule {choice.rule} (image_specificity "
                 f"{fig}): {choice.reason}")  # fmt: skip
        with ctx.progress("occlusion: deconv panel (c)", x.shape[0]) as advance:
            if layer == res.layer and res.strongest_at is not None:
                at = res.strongest_at.tolist()  # read off the sweep's unoccluded pass
            else:
                act = deconv.layer_activation(ctx.model, xs, layer)
                at = [
                    list(divmod(int(act[i, c].reshape(-1).argmax()), act.shape[-1]))
                    for i, c in enumerate(res.channels.tolist())
                ]
            seeds = [
                deconv.Seed(i, int(c), int(at[i][0]), int(at[i][1]))
                for i, c in enumerate(res.channels.tolist())
            ]
            proj = deconv.project(ctx.model, xs, layer, seeds, rule=choice.rule,
                                  progress=advance)  # fmt: skip
            projections = proj.projections
    except Exception as exc:  # noqa: BLE001 - another plugin's failure must not sink this one
        msg = f"deconv projection failed: {type(exc).__name__}: {exc}"
        warnings.warn(f"occlusion: panel (c) omitted, {msg}", stacklevel=2)
        return None, msg, None
    out = []
    for i in range(x.shape[0]):
        arr = projections[i].detach().cpu().float().numpy()
        out.append(robust_stretch(arr).transpose(1, 2, 0))
    return out, None, (choice.rule, layer)
