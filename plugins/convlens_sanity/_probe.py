"""``convlens probe sanity``: can I trust this map?

For each image and its top-1 class (or ``--target``) the probe computes every map of
:mod:`convlens_sanity._maps` and measures, per map:

1. **faithfulness**: deletion and insertion curves and their areas
   (:mod:`convlens_sanity._curves`), next to a seeded random pixel order as the chance reference;
2. **model-parameter randomisation**: the cascade of :mod:`convlens_sanity._cascade` on the first
   ``--cascade-images`` images; a map whose Spearman correlation with the trained model's map,
   averaged over the images and the cascade's steps, is ≥ :data:`RANDOMISATION_THRESHOLD` fails
   the check: it stays similar while the weights it should explain are destroyed (Adebayo et
   al.'s finding for guided backprop: unchanged once the classifier and top blocks are random);
3. **image dependence**: the mean Pearson correlation of one map's ``|importance|`` between
   every pair of different images; ≥ :data:`IMAGE_THRESHOLD` (the deconv probe's
   image-specificity threshold) means the map hardly depends on the image.

Writes ``sanity.json`` (schema in ``docs/probes/sanity.md``), ``sanity.npz`` (the inputs and every
recorded map and curve, so each number can be recomputed), ``sanity_curves.png``,
``sanity_cascade.png``, ``sanity_images.png`` and a report section with the table.
"""

from __future__ import annotations

import time
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import torch

import convlens
from convlens.errors import ConvlensError
from convlens.io import save_npz, write_json
from convlens.options import parse_str_list
from convlens.probe import ProbeContext, ProbeResult, ReportSection
from convlens.render.report import esc

from ._cascade import cascade_plan, model_blocks, randomised, similarity
from ._curves import auc, blur_sigma, blurred, curves, endpoints
from ._maps import MAP_LABELS, MAPS, MapSettings, compute_maps

__all__ = [
    "SanityProbe",
    "cross_image_correlation",
    "RANDOMISATION_THRESHOLD",
    "IMAGE_THRESHOLD",
]

#: Spearman correlation with the trained model's map, averaged over the cascade's steps and images,
#: at or above which a map fails the randomisation check.
RANDOMISATION_THRESHOLD = 0.5
#: Mean cross-image Pearson correlation at or above which a map is called image-independent (the
#: deconv probe's image-specificity threshold).
IMAGE_THRESHOLD = 0.8

_SOURCES = {
    "occlusion": "convlens occlusion probe (Section 4.2)",
    "deconvnet": "convlens deconv probe, rule deconvnet (Section 2.1)",
    "guided": "convlens deconv probe, rule guided",
    "gradient": "convlens deconv probe, rule gradient (autograd)",
    "gradcam": "captum.attr.LayerGradCam",
    "ig": "captum.attr.IntegratedGradients",
    "random": "numpy.random.default_rng(seed) uniform map",
}


def cross_image_correlation(maps: np.ndarray) -> float | None:
    """Mean Pearson correlation of ``|m_i|`` and ``|m_j|`` (flattened) over all pairs ``i < j`` of
    maps ``[N, H, W]``; None for fewer than two maps. A constant map counts as correlation 0."""
    a = np.abs(np.asarray(maps, dtype=np.float64)).reshape(len(maps), -1)
    if len(a) < 2:
        return None
    rs = []
    for i, j in combinations(range(len(a)), 2):
        if np.ptp(a[i]) == 0 or np.ptp(a[j]) == 0:
            rs.append(0.0)
        else:
            rs.append(float(np.corrcoef(a[i], a[j])[0, 1]))
    return float(np.mean(rs))


class SanityProbe(convlens.Probe):
    """Deletion/insertion curves, cascading randomisation and image dependence of every map."""

    name = "sanity"
    summary = "Can I trust this map? Deletion/insertion, randomisation and image dependence"
    paper = "Sections 2.1, 4.2 (the maps); RISE (BMVC 2018); Adebayo et al. (NeurIPS 2018)"
    options = (
        convlens.Option("maps", str, ",".join(MAPS),
                        f"Comma-separated maps to check: {', '.join(MAPS)}."),
        convlens.Option("target", int, None, "Class of every map (default: each image's top-1).",
                        min=0),
        convlens.Option("steps", int, 10, "Steps of the deletion/insertion curves.", min=2,
                        max=1000),
        convlens.Option("cascade", int, 3, "Steps of the randomisation cascade (the last one "
                        "re-initialises every block; 0: no cascade).", min=0, max=1000),
        convlens.Option("cascade_images", int, 2, "Images the cascade runs on (the first ones).",
                        min=1, max=1000),
        convlens.Option("window", int, None, "Occlusion square side in input pixels (default "
                        "the occlusion probe's: 32 at 224).", min=1),
        convlens.Option("stride", int, None, "Occlusion step in input pixels (default half the "
                        "window).", min=1),
        convlens.Option("fill", str, "mean", "Removal value: the occlusion probe's --fill "
                        "(mean, grey, v or R,G,B in [0, 1])."),
        convlens.Option("ig_steps", int, 16, "Integrated Gradients steps.", min=1, max=10000),
        convlens.Option("batch_size", int, 16, "Images per forward pass of the curves.", min=1,
                        max=100000),
    )  # fmt: skip

    # -- run ------------------------------------------------------------------------------------

    def run(self, ctx: ProbeContext) -> ProbeResult:
        from convlens_occlusion import class_names, default_window, parse_fill

        opts = ctx.options
        names = parse_str_list(opts["maps"]) or list(MAPS)
        for n in names:
            if n not in MAPS:
                raise ConvlensError(
                    f"option --maps: unknown map {n!r} (expected {', '.join(MAPS)})"
                )
        names = _available([n for n in MAPS if n in names], ctx)
        x, paths = ctx.inputs()
        x = x.to(ctx.device)
        model = ctx.model.eval()
        h, w = int(x.shape[-2]), int(x.shape[-1])
        window = opts["window"] or default_window(min(h, w))
        if window > min(h, w):
            raise ConvlensError(f"option --window {window}: larger than the input ({h}x{w})")
        stride = opts["stride"] or max(1, window // 2)
        fill_rgb, fill_how = parse_fill(opts["fill"], ctx.preprocess.mean)
        fill = tuple(float(v) for v in ctx.preprocess.to_model_space(fill_rgb))
        with torch.inference_mode():
            logits = model(x)
        if logits.dim() != 2:
            raise ConvlensError(
                f"model {ctx.model_name}: the sanity probe needs class scores [N, K], got "
                f"{tuple(logits.shape)}"
            )
        n_classes = int(logits.shape[1])
        if opts["target"] is not None and opts["target"] >= n_classes:
            raise ConvlensError(
                f"option --target {opts['target']}: the model has {n_classes} classes"
            )
        targets = (
            [int(opts["target"])] * len(x)
            if opts["target"] is not None
            else logits.argmax(1).tolist()
        )
        settings = MapSettings(
            window=int(window), stride=int(stride), fill=fill,
            gradcam_layer=_gradcam_layer(model, x), ig_steps=int(opts["ig_steps"]),
            batch_size=int(opts["batch_size"]),
        )  # fmt: skip
        seconds: dict[str, float] = {}

        t0 = time.perf_counter()
        with ctx.progress("sanity: maps", len(names)) as advance:
            maps = compute_maps(model, x, targets, names, settings, progress=advance)
        rng = np.random.default_rng(ctx.seed)
        maps["random"] = rng.random((len(x), h, w)).astype(np.float16)
        seconds["maps"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        start = blurred(x)
        ends = endpoints(model, x, targets, fill, start, int(opts["batch_size"]))
        curve = {}
        with ctx.progress("sanity: deletion/insertion", len(maps)) as advance:
            for n, m in maps.items():
                curve[n] = curves(model, x, m, targets, fill, int(opts["steps"]),
                                  int(opts["batch_size"]), start=start, ends=ends)  # fmt: skip
                advance(1)
        seconds["curves"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        casc = self._cascade(ctx, model, x, targets, names, settings, maps)
        seconds["cascade"] = time.perf_counter() - t0

        verdicts = _verdicts(names, maps, curve, casc)
        cls_names = class_names(model, n_classes)
        data = {
            "names": names,
            "maps": maps,
            "curves": curve,
            "cascade": casc,
            "verdicts": verdicts,
            "inputs": x.detach().cpu(),
            "paths": paths,
            "targets": targets,
            "class_names": cls_names,
            "settings": settings,
            "fill_rgb": fill_rgb,
            "fill_how": fill_how,
            "seconds": seconds,
            "steps": int(opts["steps"]),
            "threshold": RANDOMISATION_THRESHOLD,
        }
        files = self._write(ctx, data)
        summary = {
            "images": len(paths),
            "maps": ", ".join(names),
            "cascade": f"{len(casc['plan'])} steps over {len(casc['blocks'])} blocks on "
            f"{casc['n_images']} image(s)",
            "seconds": {k: round(v, 2) for k, v in seconds.items()},
        }
        for n in names:
            summary[n] = verdicts[n]["verdict"]
        return ProbeResult(self.name, summary=summary, files=files, data=data)

    def _cascade(self, ctx, model, x, targets, names, settings, maps) -> dict[str, Any]:
        k = int(ctx.options["cascade"])
        n_img = min(int(ctx.options["cascade_images"]), len(x))
        blocks = model_blocks(model, x)
        plan = cascade_plan(blocks, k) if k > 0 and blocks else []
        out: dict[str, Any] = {
            "blocks": [b.name for b in blocks],
            "plan": plan,
            "n_images": n_img if plan else 0,
            "maps": {n: [] for n in names},
            "spearman": {n: np.zeros((len(plan), n_img)) for n in names},
            "ssim": {n: np.zeros((len(plan), n_img)) for n in names},
        }
        if not plan:
            return out
        xs, ts = x[:n_img], targets[:n_img]
        with ctx.progress("sanity: randomisation cascade", len(plan) * len(names)) as advance:
            for s, step_blocks in enumerate(plan):
                twin = randomised(model, step_blocks, seed=int(ctx.seed) + s + 1)
                got = compute_maps(twin, xs, ts, names, settings, progress=advance)
                for n in names:
                    out["maps"][n].append(got[n])
                    for i in range(n_img):
                        rho, ss = similarity(maps[n][i], got[n][i])
                        out["spearman"][n][s, i] = rho
                        out["ssim"][n][s, i] = ss
                del twin
        out["maps"] = {n: np.stack(v) for n, v in out["maps"].items()}
        return out

    def _write(self, ctx: ProbeContext, d: dict[str, Any]) -> list[Path]:
        out = ctx.out_dir
        arrays: dict[str, Any] = {
            "inputs": d["inputs"].float().numpy(),
            "targets": np.asarray(d["targets"], dtype=np.int64),
        }
        for n, m in d["maps"].items():
            arrays[f"map_{n}"] = m
            arrays[f"deletion_{n}"] = d["curves"][n]["deletion"].astype(np.float32)
            arrays[f"insertion_{n}"] = d["curves"][n]["insertion"].astype(np.float32)
        casc = d["cascade"]
        if casc["plan"]:
            for n in d["names"]:
                arrays[f"cascade_{n}"] = casc["maps"][n]
                arrays[f"spearman_{n}"] = casc["spearman"][n]
                arrays[f"ssim_{n}"] = casc["ssim"][n]
        npz = save_npz(out / "sanity.npz", **arrays)
        s: MapSettings = d["settings"]
        h, w = d["inputs"].shape[-2:]
        js = write_json(
            out / "sanity.json",
            {
                "probe": self.name,
                "paper": self.paper,
                "model": ctx.model_name,
                "seed": ctx.seed,
                "images": [str(p) for p in d["paths"]],
                "targets": [int(t) for t in d["targets"]],
                "target_names": [d["class_names"][int(t)] for t in d["targets"]],
                "target_source": "given" if ctx.options["target"] is not None else "top-1",
                "input_size": [int(h), int(w)],
                "settings": {
                    "maps": d["names"],
                    "steps": d["steps"],
                    "pixel_order": "map descending; ties by row-major pixel index",
                    "removal": {
                        "given": ctx.options["fill"],
                        "meaning": d["fill_how"],
                        "rgb01": list(d["fill_rgb"]),
                        "model_space": list(s.fill),
                    },
                    "insertion_start": {
                        "blur": "gaussian",
                        "sigma_px": blur_sigma(int(h), int(w)),
                    },
                    "occlusion": {"window": s.window, "stride": s.stride},
                    "gradcam_layer": s.gradcam_layer,
                    "ig_steps": s.ig_steps,
                    "batch_size": s.batch_size,
                    "randomisation_threshold": RANDOMISATION_THRESHOLD,
                    "image_threshold": IMAGE_THRESHOLD,
                },
                "maps": {
                    n: {"label": MAP_LABELS[n], "source": _SOURCES[n], **d["verdicts"][n]}
                    for n in [*d["names"], "random"]
                },
                "cascade": {
                    "blocks": casc["blocks"],
                    "images": casc["n_images"],
                    "steps": [
                        {
                            "step": i + 1,
                            "blocks": len(b),
                            "top_block": b[0].name,
                            "lowest_block": b[-1].name,
                        }
                        for i, b in enumerate(casc["plan"])
                    ],  # fmt: skip
                },
                "seconds": {k: round(v, 3) for k, v in d["seconds"].items()},
                "arrays": {
                    "file": "sanity.npz",
                    "inputs": "float32 [N, 3, H, W]: the preprocessed model inputs",
                    "targets": "int64 [N]: the class of each image's maps",
                    "map_<name>": "float16 [N, H, W]: importance map / max |map| (what every "
                    "metric is computed on)",
                    "deletion_<name>": "float32 [N, steps + 1]: p(target) after each step",
                    "insertion_<name>": "float32 [N, steps + 1]: p(target) after each step",
                    "cascade_<name>": "float16 [cascade steps, cascade images, H, W]: the map "
                    "of the re-initialised model at each step",
                    "spearman_<name>": "float64 [cascade steps, cascade images]",
                    "ssim_<name>": "float64 [cascade steps, cascade images]",
                },
            },
        )
        return [js, npz]

    # -- render ---------------------------------------------------------------------------------

    def render(self, result: ProbeResult, ctx: ProbeContext) -> ReportSection | None:
        from ._render import cascade_figure, curves_figure, images_figure

        d = result.data
        figures = [curves_figure(d, ctx.out_dir / "sanity_curves.png", ctx.model_name)]
        if d["cascade"]["plan"]:
            figures.append(cascade_figure(d, ctx.out_dir / "sanity_cascade.png", ctx.model_name,
                                          ctx.preprocess))  # fmt: skip
        figures.append(images_figure(d, ctx.out_dir / "sanity_images.png", ctx.model_name,
                                     ctx.preprocess))  # fmt: skip
        rel = [f"{self.name}/{p.name}" for p in figures]
        return ReportSection(
            "Can I trust this map? (sanity checks)", _section_html(d, rel), rel, order=60
        )

    def describe(self, result: ProbeResult) -> list[tuple[str, str]]:
        return [(k, str(v)) for k, v in result.summary.items()]


#: The plugin each of convlens's own maps comes from (Captum's are a dependency of convlens).
_PLUGIN = {"occlusion": "convlens_occlusion", "deconvnet": "convlens_deconv",
           "guided": "convlens_deconv", "gradient": "convlens_deconv"}  # fmt: skip


def _available(names: list[str], ctx: ProbeContext) -> list[str]:
    """``names`` less the maps whose plugin cannot be imported (said in a note)."""
    import importlib

    keep = []
    for n in names:
        mod = _PLUGIN.get(n)
        try:
            if mod:
                importlib.import_module(mod)
        except ImportError as exc:
            ctx.note(f"sanity: map {n} skipped, its plugin {mod} cannot be imported ({exc})")
            continue
        keep.append(n)
    if not keep:
        raise ConvlensError("option --maps: none of the maps can be computed here")
    return keep


def _gradcam_layer(model: torch.nn.Module, x: torch.Tensor) -> str:
    """The module Grad-CAM reads: the top convolutional layer (a functional op: its module)."""
    from convlens.engine import resolve_layer, top_conv_layer, trace_model

    name = resolve_layer(model, top_conv_layer(model, trace_model(model, x[:1]))).name
    return name.split("/")[0] if "/" in name else name


def _verdicts(names, maps, curve, casc) -> dict[str, dict[str, Any]]:
    ref_del = float(auc(curve["random"]["deletion"]).mean())
    ref_ins = float(auc(curve["random"]["insertion"]).mean())
    out: dict[str, dict[str, Any]] = {}
    for n in [*names, "random"]:
        dels, inss = auc(curve[n]["deletion"]), auc(curve[n]["insertion"])
        v: dict[str, Any] = {
            "deletion_auc": float(dels.mean()),
            "insertion_auc": float(inss.mean()),
            "per_image": {"deletion_auc": dels.tolist(), "insertion_auc": inss.tolist()},
            "cross_image_correlation": cross_image_correlation(maps[n]),
        }
        if n == "random":
            v["verdict"] = "chance reference for the curves"
            out[n] = v
            continue
        r = v["cross_image_correlation"]
        v["image_independent"] = r is not None and r >= IMAGE_THRESHOLD
        # insertion − deletion: random pixel removal adds high-frequency noise that alone sinks
        # the class, so the random order's deletion AUC is low and deletion alone cannot be
        # compared with chance
        v["beats_random"] = bool(v["insertion_auc"] - v["deletion_auc"] > ref_ins - ref_del)
        if casc["plan"]:
            sp, ss = casc["spearman"][n], casc["ssim"][n]
            v["randomisation"] = {
                "spearman": sp.mean(1).tolist(),
                "ssim": ss.mean(1).tolist(),
                "per_image_spearman": sp.tolist(),
                "per_image_ssim": ss.tolist(),
            }
            v["last_spearman"] = float(sp[-1].mean())
            v["last_ssim"] = float(ss[-1].mean())
            v["mean_spearman"] = float(sp.mean())
            v["fails_randomisation"] = v["mean_spearman"] >= RANDOMISATION_THRESHOLD
        else:
            v["randomisation"] = None
            v["last_spearman"] = v["last_ssim"] = v["mean_spearman"] = None
            v["fails_randomisation"] = None
        v["verdict"] = _sentence(n, v)
        out[n] = v
    return out


def _sentence(n: str, v: dict[str, Any]) -> str:
    parts = []
    if v["fails_randomisation"]:
        parts.append(
            f"fails the randomisation check: while the model's blocks are re-initialised from "
            f"the top it keeps Spearman {v['mean_spearman']:.2f} on average with the trained "
            f"model's map ({v['last_spearman']:.2f} with every weight random), so it shows the "
            "image and the architecture more than what the model learnt"
        )
    elif v["fails_randomisation"] is False:
        parts.append(
            f"passes the randomisation check (mean Spearman {v['mean_spearman']:.2f} over the "
            f"cascade, {v['last_spearman']:.2f} with every weight random)"
        )
    if v["image_independent"]:
        parts.append(
            f"is nearly the same picture for every image (cross-image r "
            f"{v['cross_image_correlation']:.2f})"
        )
    if not v["beats_random"]:
        parts.append("does not beat a random pixel order (insertion AUC − deletion AUC)")
    if not parts:
        return "no warning"
    return f"{MAP_LABELS.get(n, n)} " + "; ".join(parts) + "."


def _section_html(d: dict[str, Any], figures: list[str]) -> str:
    v = d["verdicts"]
    rows = []
    for n in [*d["names"], "random"]:
        r = v[n]
        ci = r["cross_image_correlation"]
        last = r.get("last_spearman")
        flag = []
        if r.get("fails_randomisation"):
            flag.append("fails randomisation")
        if r.get("image_independent"):
            flag.append("image-independent")
        if n != "random" and not r.get("beats_random"):
            flag.append("no better than random")
        rand = (
            "&ndash;"
            if last is None
            else f"{last:.2f} / {r['last_ssim']:.2f} (mean over steps {r['mean_spearman']:.2f})"
        )
        rows.append(
            f"<tr><td>{esc(MAP_LABELS[n])}</td><td>{r['deletion_auc']:.3f}</td>"
            f"<td>{r['insertion_auc']:.3f}</td><td>{rand}</td>"
            f"<td>{'&ndash;' if ci is None else f'{ci:.2f}'}</td>"
            f"<td>{esc(', '.join(flag)) or 'ok' if n != 'random' else 'reference'}</td></tr>"
        )
    warn = [
        v[n]["verdict"]
        for n in d["names"]
        if v[n].get("fails_randomisation") or v[n]["image_independent"] or not v[n]["beats_random"]
    ]
    fails = [MAP_LABELS[n] for n in d["names"] if v[n].get("fails_randomisation")]
    casc = d["cascade"]
    s: MapSettings = d["settings"]
    verdict = (
        f"<p><b>Randomisation check: {esc(', '.join(fails))} "
        f"{'fails' if len(fails) == 1 else 'fail'}</b> on this model.</p>"
        if fails
        else ("<p><b>Randomisation check: every map passes</b> on this model.</p>"
              if casc["plan"] else "")
    )  # fmt: skip
    return (
        f"<p>Every map convlens draws for each image's "
        f"{'given class' if d['targets'] and len(set(d['targets'])) == 1 else 'top-1 class'}, "
        "next to Grad-CAM and Integrated Gradients from Captum, checked three ways "
        f"({len(d['paths'])} images).</p>"
        + verdict
        + "<table><tr><th>map</th><th>deletion AUC &darr;</th><th>insertion AUC &uarr;</th>"
        "<th>randomisation similarity at the last step (Spearman / SSIM) &darr;</th>"
        "<th>image dependence: cross-image r &darr;</th><th>flags</th></tr>"
        + "".join(rows)
        + "</table>"
        "<ul>"
        f"<li><b>Deletion / insertion AUC</b> (Petsiuk et al. 2018): pixels are removed (set to "
        f"the {esc(d['fill_how'])}) or revealed (on a blurred copy) in the map's order, in "
        f"{d['steps']} steps; the area under p(class). A faithful map makes deletion fall fast "
        "(low) and insertion rise fast (high); the random row is chance. A map is flagged when its "
        "insertion &minus; deletion is not above the random order's (random pixel removal alone "
        "sinks the class with high-frequency noise, so deletion by itself is no test).</li>"
        "<li><b>Randomisation similarity</b> (Adebayo et al. 2018): the model's blocks are "
        f"re-initialised from the top in {len(casc['plan'])} cumulative steps "
        f"({len(casc['blocks'])} blocks, on {casc['n_images']} image(s)); the number is the map's "
        "similarity to the trained model's once every block is random, and in brackets the "
        "Spearman averaged over the steps. High means the map hardly depends on what the model "
        f"learnt: a map is flagged when that average is &ge; {RANDOMISATION_THRESHOLD}.</li>"
        "<li><b>Image dependence</b>: the mean correlation of one map between different images; "
        f"near 1 means the same picture whatever the image (flagged at &ge; {IMAGE_THRESHOLD}).</li>"
        f"<li>Occlusion: square {s.window} px, stride {s.stride} px; Grad-CAM at "
        f"<code>{esc(s.gradcam_layer)}</code>; Integrated Gradients in {s.ig_steps} steps from "
        "the fill image.</li></ul>"
        + ("<p>" + "<br>".join(esc(w) for w in warn) + "</p>" if warn else "")
        + "".join(f'<figure><img src="{esc(f)}" alt="{esc(f)}"></figure>' for f in figures)
    )
