"""``convlens probe deconv``: the probe that wires mining, projection and figures together.

Run order (Section 2.1, Section 4, Figs. 2, 4, 6 and the poster's layer-by-layer row):

1. the layers: ``--layer`` (one or several), else about five spread by receptive-field size
   (:func:`convlens.engine.depth_layers`, the paper's "layers 1–5");
2. mine the top-k activations of every channel of those layers over the images in one streaming
   pass (sharded and merged under ``torchrun``); with no ``--images``, the embedded mining set
   (:func:`convlens.data.mining_set`);
3. per layer: the backward rule (``--rule``; ``auto`` measures image_specificity on a few photos,
   :mod:`convlens_deconv._specificity`), the channels to show (the strongest, unless
   ``--channels``), their top-k projected in batched passes (plus any ``--neuron``);
4. the poster: the strongest activation of each layer per image, with each layer's rule;
5. first-layer filter diagnostics (Fig. 6), optionally against a second model (``--compare``);
6. with ``--checkpoints``, the feature evolution grid (Fig. 4);
7. ``deconv.json`` + ``deconv.npz`` (schema in ``docs/probes/deconv.md``) and the PNG figures.
"""

from __future__ import annotations

import re
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import convlens
from convlens.data import Preprocess, find_images, load_image
from convlens.engine import depth_layers, resolve_layer, trace_model, unsaturated
from convlens.errors import ConvlensError
from convlens.io import save_npz, write_json
from convlens.options import parse_int_list, parse_str_list
from convlens.render import grid, robust_stretch
from convlens.render.crops import crop_side, cut, unit_box, unit_center
from convlens.render.report import esc
from convlens_deconv._figures import (
    compare_models,
    default_poster_layers,
    evolution_from_checkpoints,
    filters_for,
    first_conv_weight,
    jsonable_evolution,
    stretch_crop,
)
from convlens_deconv._mining import init_distributed, mine_topk_layers
from convlens_deconv._project import Seed, project, strongest_seeds
from convlens_deconv._render import (
    BACKGROUND,
    UnitTiles,
    evolution_grid,
    fig2_canvas,
    filters_canvas,
    patch_tile,
    poster_canvas,
    projection_tile,
    resize,
    seed_box,
    titled,
)
from convlens_deconv._specificity import (
    RULE_CHOICES,
    SPECIFICITY_THRESHOLD,
    RuleChoice,
    choose_rule,
)

__all__ = ["DeconvProbe"]

#: Channels projected and drawn per layer when ``--channels`` is not given.
DEFAULT_CHANNELS = 8
#: Photos the ``auto`` rule measures image_specificity on.
REFERENCE_IMAGES = 4
#: Version of deconv.json / deconv.npz (2: several layers, rules, per-layer crop arrays).
SCHEMA = 2


class DeconvProbe(convlens.Probe):
    """Deconvnet projections of the strongest activations (Zeiler & Fergus, Section 2.1)."""

    name = "deconv"
    summary = "Deconvnet: top-k activations projected to pixels, layer by layer, filters"
    paper = "Section 2.1, Fig. 1; Section 4, Figs. 2, 4, 6"
    options = (
        convlens.Option(
            "layer",
            str,
            None,
            "Layer(s) to visualise, comma-separated (alias such as conv5, module name or "
            "parent/op). Default: about five layers spread by receptive-field size.",
        ),
        convlens.Option(
            "rule",
            str,
            "auto",
            "Backward rule at rectifiers: 'deconvnet' (the paper, Section 2.1), 'guided' "
            "(guided backprop), 'gradient' (plain autograd), or 'auto': the deconvnet where "
            "its projections depend on the image (measured), else guided.",
            choices=RULE_CHOICES,
        ),
        convlens.Option(
            "channels",
            str,
            None,
            "Channels of each layer: '0-15,20' or 'all'. Default: the --render-channels "
            "channels whose top-k activations are strongest.",
        ),
        convlens.Option(
            "top", int, 9, "Top-k activations per channel across the images (Fig. 2).", min=1
        ),
        convlens.Option(
            "per_image", int, 1, "At most this many of a channel's top-k per image.", min=1
        ),
        convlens.Option(
            "mode",
            str,
            "paper",
            "Contrast normalisation: 'paper' skips it (Section "
            "2.1), 'captum' back-propagates through it.",
            choices=("paper", "captum"),
        ),
        convlens.Option(
            "method",
            str,
            "auto",
            "Deconvnet form: literal 'chain' walk, 'general' modified backward pass, or 'auto'.",
            choices=("auto", "chain", "general"),
        ),
        convlens.Option(
            "start",
            str,
            "activation",
            "Value fed down: the unit's rectified 'activation' (the paper) or 'one' (Captum).",
            choices=("activation", "one"),
        ),
        convlens.Option(
            "neuron",
            str,
            None,
            "Also project IMAGE,CHANNEL,Y,X at the deepest layer (IMAGE: index in the "
            "image list; Y,X in the layer's map; IMAGE,CHANNEL for fc layers). "
            "Repeatable.",
            multiple=True,
        ),
        convlens.Option(
            "poster",
            bool,
            True,
            "Strongest activation of each layer per image, "
            "projected side by side (the poster figure).",
        ),
        convlens.Option(
            "poster_layers",
            str,
            None,
            "Comma-separated layers for the poster. Default: the layers of the run "
            "(with --layer: conv1..convK aliases, else timm's feature stages).",
        ),
        convlens.Option(
            "poster_images",
            int,
            6,
            "Images for the poster, the filter activations, the rule check, --compare and "
            "--checkpoints: the first ones of --images, else the bundled photos.",
            min=1,
        ),
        convlens.Option(
            "compare",
            str,
            None,
            "Second model for the Fig. 6 layer-1/layer-2 comparison, e.g. alexnet.",
        ),
        convlens.Option("compare_weights", Path, None, "Weights for the --compare model."),
        convlens.Option(
            "checkpoints",
            Path,
            None,
            "Checkpoints of the model, in training order: Fig. 4 feature evolution. Repeatable.",
            multiple=True,
        ),
        convlens.Option("evolution_channels", str, "0-7", "Channels shown in the Fig. 4 grid."),
        convlens.Option("batch_size", int, 16, "Images per forward pass while mining.", min=1),
        convlens.Option(
            "render_channels",
            int,
            DEFAULT_CHANNELS,
            "Channels per layer drawn in Fig. 2 (and projected when --channels is not given).",
            min=1,
        ),
    )

    # ------------------------------------------------------------------------------------------
    def run(self, ctx: convlens.ProbeContext) -> convlens.ProbeResult:
        o = ctx.options
        model = ctx.model
        pre = ctx.preprocess or Preprocess.for_model(model)
        ctx.preprocess = pre
        info = getattr(model, "convlens_info", None)
        requested = list(dict.fromkeys(parse_str_list(o["layer"]))) if o["layer"] else []
        for lay in requested:
            resolve_layer(model, lay)  # a misspelt layer fails before any work
        timings: dict[str, float] = {}
        created_group = _init_distributed(ctx)

        # the images: what is mined, and the few photos for the poster and the rule check ---
        if ctx.images_given:
            files = find_images(ctx.images)
            mining_source = "images"
        else:
            from convlens.data import mining_set

            t = time.perf_counter()
            with ctx.progress("embedded mining set (built once)", None) as advance:
                files = mining_set(progress=advance)
            timings["mining_set_s"] = time.perf_counter() - t
            mining_source = "embedded mining set"
        extra = [] if ctx.images_given else [p for p in find_images(ctx.images) if p not in files]
        bank = _InputBank(files + extra, pre, ctx.device)
        if ctx.images_given:
            fixed_idx = bank.first_readable(o["poster_images"])
        else:
            fixed_idx = bank.first_readable(o["poster_images"], start=len(files))
        x_fixed = bank.subset(bank.rows(fixed_idx))[0] if fixed_idx else bank.example()

        # the layers ---------------------------------------------------------------------------
        rec = trace_model(model, bank.example())
        if requested:
            layers = []
            for lay in requested:
                sub = unsaturated(rec, lay)
                if sub != lay:
                    ctx.note(f"deconv {lay}: ends in a rectifier with a ceiling (ReLU6); its "
                             "strongest activations tie there and guided backprop projects "
                             f"them to zero: mining and projecting its input {sub} instead")  # fmt: skip
                layers.append(sub)
            layers = list(dict.fromkeys(layers))
        else:
            layers = [lay for lay, _ in depth_layers(model, rec=rec)]
        _check_maps(ctx.model_name, rec, layers, bool(requested))
        order = {lay: rec.layer(lay).index for lay in layers}
        layers = sorted(layers, key=lambda lay: order[lay])
        deepest = layers[-1]
        hw = tuple(pre.input_size)

        # 1. mining: every layer in one pass ---------------------------------------------------
        explicit = None
        all_channels = isinstance(o["channels"], str) and o["channels"].strip().lower() == "all"
        if o["channels"] and not all_channels:
            explicit = parse_int_list(o["channels"], "channels")
        t = time.perf_counter()
        with ctx.progress(
            f"mining top-{o['top']} at {len(layers)} layer(s)", len(files)
        ) as advance:
            topks = mine_topk_layers(
                model,
                layers,
                ctx.images if ctx.images_given else files,  # folders: unreadable files skipped
                channels=dict.fromkeys(layers, explicit),
                k=o["top"],
                per_image=o["per_image"],
                preprocess=pre,
                batch_size=o["batch_size"],
                device=ctx.device,
                progress=advance,
                stop_at=deepest,
            )
        timings["mining_s"] = time.perf_counter() - t
        if created_group:
            import torch.distributed as dist

            dist.destroy_process_group()

        # 2. per layer: the rule, the channels, the projections ------------------------------
        x_ref = x_fixed[:REFERENCE_IMAGES]
        if x_ref.shape[0] < 2:  # one image cannot show whether a picture depends on it
            from convlens.data import default_images, load_batch

            x_ref, _ = load_batch(default_images()[:REFERENCE_IMAGES], pre)
            x_ref = x_ref.to(ctx.device)
        entries: list[dict[str, Any]] = []
        arrays: dict[str, np.ndarray] = {}
        layer_docs: list[dict[str, Any]] = []
        choices: dict[str, RuleChoice] = {}
        t_rule = t_proj = 0.0
        for li, lay in enumerate(layers):
            t = time.perf_counter()
            choice = choose_rule(model, x_ref, lay, o["rule"], mode=o["mode"], method=o["method"])
            choices[lay] = choice
            t_rule += time.perf_counter() - t
            _announce(ctx, choice)
            topk = topks[lay]
            shown = _shown_channels(topk, explicit, all_channels, o["render_channels"])
            found = [e for e in topk.entries() if e["channel"] in set(shown)]
            rf = rec.rf(lay)
            t = time.perf_counter()
            ldoc: dict[str, Any] = {
                "layer": lay,
                "layer_resolved": resolve_layer(model, lay).key,
                "receptive_field": rf.to_dict() if rf else None,
                "rf_share": _rf_share(rf, hw),
                "rule": choice.rule,
                "rule_choice": choice.to_dict(),
                "image_specificity": choice.figure,
                "channels": shown,
                "channels_mined": len(topk.channels),
                "map_shape": list(topk.map_shape),
                "distinct_images": _distinct(topk, shown),
            }
            if found:
                rows = bank.rows([e["image"] for e in found])
                x_sub, local = bank.subset(rows)  # only the images these seeds come from
                seeds = [
                    Seed(local[r], e["channel"], e["y"], e["x"])
                    for r, e in zip(rows, found, strict=True)
                ]
                with ctx.progress(f"projecting {len(seeds)} at {lay}", len(seeds)) as advance:
                    res = project(
                        model,
                        x_sub,
                        lay,
                        seeds,
                        method=o["method"],
                        mode=o["mode"],
                        start=o["start"],
                        rule=choice.rule,
                        progress=advance,
                    )
                ldoc.update(
                    method=res.method, method_reason=res.reason, rectified_ops=res.modified_ops
                )
                proj = res.projections.detach().float().cpu().numpy()
                centers = [unit_center(rf, e["y"], e["x"], hw) for e in found]
                side = crop_side(rf, hw, list(proj), centers)
                ldoc["crop_size"] = list(side)
                p_crops, q_crops = [], []
                for j, (e, r, a) in enumerate(zip(found, rows, res.activations, strict=True)):
                    box = unit_box(rf, e["y"], e["x"], hw, side)
                    p_crops.append(cut(proj[j], box, 0.0).astype(np.float32))
                    img01 = pre.denormalize(bank.tensors[r][None].detach().float().cpu())[0]
                    q_crops.append(_to_uint8(cut(img01.numpy(), box, 0.0)))
                    entries.append(
                        _entry(
                            "topk",
                            e["rank"],
                            lay,
                            li,
                            e["channel"],
                            e["y"],
                            e["x"],
                            float(a),
                            files[e["image"]],
                            rf,
                            hw,
                            o["start"],
                            box,
                            choice.rule,
                            f"layer{li}_projections",
                            j,
                        )  # fmt: skip
                    )
                arrays[f"layer{li}_projections"] = np.stack(p_crops)
                arrays[f"layer{li}_patches"] = np.stack(q_crops)
            t_proj += time.perf_counter() - t
            layer_docs.append(ldoc)
        timings["rule_check_s"] = t_rule
        timings["projection_s"] = t_proj

        # 2b. chosen neurons, at the deepest layer -------------------------------------------
        neurons = [_parse_neuron(text, len(files)) for text in o["neuron"] or []]
        if neurons:
            rows = bank.rows([n[0] for n in neurons])
            x_sub, local = bank.subset(rows)
            seeds = [Seed(local[r], c, y, x) for r, (_, c, y, x) in zip(rows, neurons, strict=True)]
            rule = choices[deepest].rule
            res = project(model, x_sub, deepest, seeds, method=o["method"],
                          mode=o["mode"], start=o["start"], rule=rule)  # fmt: skip
            rf = rec.rf(deepest)
            side = tuple(layer_docs[-1].get("crop_size") or crop_side(rf, hw))
            for j, ((img, c, y, x), a) in enumerate(zip(neurons, res.activations, strict=True)):
                box = unit_box(rf, y, x, hw, side)
                entries.append(
                    _entry(
                        "neuron",
                        None,
                        deepest,
                        len(layers) - 1,
                        c,
                        y,
                        x,
                        float(a),
                        files[img],
                        rf,
                        hw,
                        o["start"],
                        box,
                        rule,
                        "neuron_projections",
                        j,
                    )  # fmt: skip
                )
            arrays["neuron_projections"] = res.projections.detach().float().cpu().numpy()

        # 3. poster: the strongest activation of each layer ----------------------------------
        poster: dict[str, Any] = {}
        t = time.perf_counter()
        if o["poster"] and fixed_idx:
            if o["poster_layers"]:
                p_layers = parse_str_list(o["poster_layers"])
            elif requested:
                p_layers = default_poster_layers(model, deepest)
            else:
                p_layers = list(layers)
            poster = {"layers": p_layers, "images": [str(bank.files[i]) for i in fixed_idx],
                      "rules": [], "entries": []}  # fmt: skip
            acts = _activations(model, x_fixed, p_layers)  # one inference pass for every layer
            sides = {ld["layer"]: tuple(ld["crop_size"]) for ld in layer_docs if "crop_size" in ld}
            for pi, lay in enumerate(p_layers):
                p_proj: list[np.ndarray] = []  # this layer's crops (one size per layer)
                if lay not in choices:
                    choices[lay] = choose_rule(model, x_ref, lay, o["rule"], mode=o["mode"],
                                               method=o["method"])  # fmt: skip
                    _announce(ctx, choices[lay])
                rule = choices[lay].rule
                poster["rules"].append(rule)
                seeds = strongest_seeds(acts[lay])
                with ctx.progress(f"poster: {lay}", len(seeds)) as advance:
                    res = project(model, x_fixed, lay, seeds, method=o["method"], mode=o["mode"],
                                  start=o["start"], rule=rule, progress=advance)  # fmt: skip
                pp = res.projections.detach().float().cpu().numpy()
                rf = res.receptive_field
                side = sides.get(lay) or crop_side(
                    rf, hw, list(pp), [unit_center(rf, sd.y, sd.x, hw) for sd in seeds]
                )
                for s, p, a in zip(seeds, pp, res.activations, strict=True):
                    box = unit_box(rf, s.y, s.x, hw, side)
                    entries.append(
                        _entry(
                            "poster",
                            None,
                            lay,
                            None,
                            s.channel,
                            s.y,
                            s.x,
                            float(a),
                            bank.files[fixed_idx[s.image]],
                            rf,
                            hw,
                            o["start"],
                            box,
                            rule,
                            f"poster{pi}_projections",
                            len(p_proj),
                        )  # fmt: skip
                    )
                    p_proj.append(cut(p, box, 0.0).astype(np.float32))
                    poster["entries"].append(len(entries) - 1)
                arrays[f"poster{pi}_projections"] = np.stack(p_proj)
        timings["poster_s"] = time.perf_counter() - t

        # 4. filters (Fig. 6) -----------------------------------------------------------------
        t = time.perf_counter()
        filters = filters_for(model, x_fixed)
        compare: dict[str, Any] | None = None
        if o["compare"]:
            compare = compare_models(ctx, model, o, [bank.files[i] for i in fixed_idx] or files[:1])
        timings["filters_s"] = time.perf_counter() - t

        # 5. feature evolution (Fig. 4) -------------------------------------------------------
        evolution: dict[str, Any] | None = None
        evo_proj = None
        if o["checkpoints"]:
            t = time.perf_counter()
            evolution, evo_proj, evo_fields = evolution_from_checkpoints(
                model, o, deepest, x_fixed, topks[deepest].channels,
                list(range(len(fixed_idx))),
            )  # fmt: skip
            evolution["fields"] = evo_fields
            timings["evolution_s"] = time.perf_counter() - t

        # 6. outputs --------------------------------------------------------------------------
        fixed_inputs = x_fixed.detach().float().cpu()
        arrays["fixed_inputs"] = fixed_inputs.numpy()
        compare_weight = None
        if compare is not None:
            arrays["compare_projections"] = compare.pop("_projections")
            arrays["compare_inputs"] = compare.pop("_inputs")
            compare_weight = compare.pop("_weight_ref")
        if evo_proj is not None:
            arrays["evolution_projections"] = evo_proj.numpy()
        npz = save_npz(ctx.out_dir / "deconv.npz", **arrays)
        main = layer_docs[-1]
        choice = choices[deepest]
        doc = {
            "schema_version": SCHEMA,
            "probe": self.name,
            "paper": self.paper,
            "model": ctx.model_name,
            "weights": getattr(info, "weights", None),
            "random_weights": bool(getattr(info, "random_init", False)),
            "seed": ctx.seed,
            "layer": deepest,
            "layer_resolved": main["layer_resolved"],
            "receptive_field": main["receptive_field"],
            "rule": choice.rule,
            "rule_requested": o["rule"],
            "rule_reason": choice.reason,
            "image_specificity": choice.figure,
            "image_specificity_threshold": SPECIFICITY_THRESHOLD,
            "method": main.get("method"),
            "method_reason": main.get("method_reason"),
            "rectified_ops": main.get("rectified_ops", {}),
            "mode": o["mode"],
            "start": o["start"],
            "contrast": "per projection: 0.5 + p / (2 s) clipped, s = 99.5th percentile of |p| "
            "over the crop's non-zero values",
            "crops": "receptive-field box when smaller than the image, else the square holding "
            "90% of the layer's projection mass (convlens.render.crops)",
            "k": o["top"],
            "per_image": o["per_image"],
            "channels": main["channels"],
            "layers": layer_docs,
            "mining": {
                "source": mining_source,
                "images": topks[deepest].n_images,
                "candidates": len(files),
                "world_size": topks[deepest].world_size,
                "map_shape": list(topks[deepest].map_shape),
            },
            "input_shape": [3, *hw],
            "preprocess": pre.to_dict(),
            "fixed_images": [str(bank.files[i]) for i in fixed_idx],
            "projections": entries,
            "poster": poster or None,
            "filters": filters,
            "compare": compare,
            "evolution": jsonable_evolution(evolution),
            "timings_s": {k: round(v, 3) for k, v in timings.items()},
        }
        js = write_json(ctx.out_dir / "deconv.json", doc)
        summary = {
            "layers": ", ".join(layers),
            "rule": ", ".join(f"{d['layer']}: {d['rule']}" for d in layer_docs),
            "image_specificity": ", ".join(
                "-" if d["image_specificity"] is None else f"{d['image_specificity']:.2f}"
                for d in layer_docs
            ),
            "images mined": topks[deepest].n_images,
            "projections": len(entries),
            "strongest": _strongest(entries, deepest),
            "layer-1 dead filters": len(filters["dead"]) if filters else None,
            **{k: round(v, 2) for k, v in timings.items()},
        }
        data = {
            "doc": doc,
            "arrays": arrays,
            "fixed_inputs": fixed_inputs,
            "compare_arrays": (arrays.get("compare_projections"), arrays.get("compare_inputs")),
            "evolution_projections": evo_proj,
            "evolution_fields": evolution and evolution.get("fields"),
            "filters_weight": first_conv_weight(model),
            "compare_weight": compare_weight,
        }
        return convlens.ProbeResult(self.name, summary=summary, files=[js, npz], data=data)

    # ------------------------------------------------------------------------------------------
    def render(
        self, result: convlens.ProbeResult, ctx: convlens.ProbeContext
    ) -> convlens.ReportSection | None:
        d = result.data
        doc = d["doc"]
        arrays = d["arrays"]
        pre = ctx.preprocess
        out = ctx.out_dir
        figures: list[str] = []
        html: list[str] = []
        model_label = doc["model"] + (" (random weights)" if doc["random_weights"] else "")
        if doc["random_weights"]:
            html.append(
                '<p class="warn">Random weights: these projections show the '
                "architecture's geometry, not learned features.</p>"
            )
        html.append(
            f"<p>{len(doc['layers'])} layer(s), top-{doc['k']} over {doc['mining']['images']} "
            f"image(s) ({esc(doc['mining']['source'])}); mode <b>{esc(doc['mode'])}</b>, start "
            f"<b>{esc(doc['start'])}</b>. <b>Backward rule</b> (<code>--rule "
            f"{esc(doc['rule_requested'])}</code>) and <b>image_specificity</b> — the mean cosine "
            "similarity between projections of the same unit seeded on different photos (1.0: the "
            "picture does not depend on the image; warned above "
            f"{doc['image_specificity_threshold']}):</p>"
        )
        html.append(_rules_table(doc["layers"]))
        # Fig. 2, one figure per layer
        tile = 72
        for li, ld in enumerate(doc["layers"]):
            name = f"layer{li}"
            if f"{name}_projections" not in arrays:
                continue
            units = _unit_tiles(doc["projections"], arrays, name, ld["channels"], tile)
            units = units[: ctx.options["render_channels"]]
            if not units:
                continue
            fname = f"fig2_{li}_{_safe(ld['layer'])}.png"
            m = max(len(u.projections) for u in units)
            title, caption = _fig2_text(doc, ld, model_label, len(units), m)
            fig2_canvas(units, title, caption).save(out / fname)
            figures.append(f"deconv/{fname}")
            html.append(_figure(f"deconv/{fname}", esc(" ".join(caption))))
        # poster
        poster = doc.get("poster")
        if poster and poster["entries"]:
            png = _poster_png(doc, arrays, d["fixed_inputs"], pre, model_label)
            png.save(out / "poster_layers.png")
            figures.append("deconv/poster_layers.png")
            html.append(
                _figure(
                    "deconv/poster_layers.png",
                    "The strongest activation of each layer in each image, projected to pixels "
                    "with that layer's rule, cut to the unit's crop (receptive field, or where 90% "
                    "of the projections' mass lies) and contrast-normalised on its own; first "
                    "column: the image.",
                )
            )
        # Fig. 6 filters (and the compared model's)
        tiles = [("fig6_filters.png", d["filters_weight"], doc["model"], doc["filters"])]
        if doc["compare"]:
            c = doc["compare"]
            tiles.append(("fig6_filters_compare.png", d["compare_weight"], c["model"],
                          c["filters"]))  # fmt: skip
        for fname, w, label, diag in tiles:
            if w is None:
                continue
            title, caption, dead, dom = _fig6_text(label, w, diag)
            filters_canvas(w, title, caption, dead, dom).save(out / fname)
            figures.append(f"deconv/{fname}")
            html.append(_figure(f"deconv/{fname}", esc(" ".join(caption))))
        if doc["filters"]:
            html.append(
                _filters_table(
                    [("this model", doc["filters"])]
                    + (
                        [(doc["compare"]["model"], doc["compare"]["filters"])]
                        if doc["compare"]
                        else []
                    )
                )
            )
        # Fig. 6 (d)/(e): layer 2 of both models
        if doc["compare"]:
            cp, _ = d["compare_arrays"]
            c = doc["compare"]
            panels = []
            for block in (c["main_layer2"], c["compare_layer2"]):
                tiles2 = [
                    resize(stretch_crop(cp[i], block["crops"][j]), 64)
                    for j, i in enumerate(block["indices"][:16])
                ]
                if tiles2:
                    panels.append(grid(tiles2, 8, pad=1))
            if panels:
                text = (
                    f"Layer-2 features of {doc['model']} ({c['main_layer2']['layer']}, top) and "
                    f"of {c['model']} ({c['compare_layer2']['layer']}, bottom): the strongest "
                    "activation of the first channels across the images, projected. Mean "
                    "high-frequency share of the projections: "
                    f"{c['main_layer2']['bands_mean']['high']:.3f} vs "
                    f"{c['compare_layer2']['bands_mean']['high']:.3f}."
                )
                titled(
                    grid(panels, 1, pad=6, pad_value=0.85),
                    [f"Fig. 6(d)/(e) · layer 2 of {doc['model']} vs {c['model']}"],
                    [text],
                ).save(out / "fig6_compare_layer2.png")
                figures.append("deconv/fig6_compare_layer2.png")
                html.append(_figure("deconv/fig6_compare_layer2.png", esc(text)))
        # Fig. 4 evolution
        if doc["evolution"] and d["evolution_projections"] is not None:
            ev = doc["evolution"]
            fields = d["evolution_fields"]
            images01 = pre.denormalize(d["fixed_inputs"]).numpy()
            cells = []
            tile = 64
            for ci, row in enumerate(ev["cells"]):
                r = []
                for si, cell in enumerate(row):
                    box, _ = seed_box(
                        fields[si], cell["y"], cell["x"], tuple(doc["input_shape"][1:])
                    )
                    p = projection_tile(d["evolution_projections"][ci, si].numpy(), box, tile)
                    q = patch_tile(images01[ev["input_rows"][cell["image"]]], box, tile)
                    r.append(np.concatenate([p, np.ones((tile, 2, 3)), q], axis=1))
                cells.append(r)
            text = (
                "Rows: channels " + ", ".join(str(c) for c in ev["channels"]) + "; columns: "
                "checkpoints " + ", ".join(ev["labels"]) + ". Each cell: the channel's strongest "
                "activation across the images, projected (left) beside its image patch (right)."
            )
            titled(
                evolution_grid(cells),
                [f"Fig. 4 · feature evolution of {ev['layer']} ({model_label})"],
                [text],
            ).save(out / "fig4_evolution.png")
            figures.append("deconv/fig4_evolution.png")
            html.append(_figure("deconv/fig4_evolution.png", esc(text)))
        html.append(
            "<p>Data: <code>deconv/deconv.json</code> (every layer's rule and its reason, every "
            "projection: image, layer, channel, position, activation, crop box) and "
            "<code>deconv/deconv.npz</code> (per layer <code>layerN_projections</code> and "
            "<code>layerN_patches</code> cut to the crop boxes; <code>posterN_projections</code>)."
            "</p>"
        )
        return convlens.ReportSection(
            "Deconvnet projections (Section 2.1, Figs. 2, 4, 6)", "".join(html), figures, order=20
        )


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


class _InputBank:
    """The preprocessed images the projections belong to, loaded on demand from the file list
    (only those in some top-k, the poster and ``--neuron``) and kept in first-use order."""

    def __init__(self, files: list[Path], pre: Preprocess, device: torch.device) -> None:
        self.files = files
        self.pre = pre
        self.device = device
        self.index: dict[int, int] = {}
        self.tensors: list[torch.Tensor] = []

    def rows(self, file_indices: list[int]) -> list[int]:
        for i in file_indices:
            if i not in self.index:
                t = self.pre(load_image(self.files[i]))  # may raise: register only what loaded
                self.index[i] = len(self.tensors)
                self.tensors.append(t)
        return [self.index[i] for i in file_indices]

    def first_readable(self, n: int, start: int = 0) -> list[int]:
        """Indices of the first ``n`` files from ``start`` on that load (unreadable ones skipped
        with a warning, as the mining pass does)."""
        from convlens.data import SkippedImageWarning
        from convlens.errors import ImageError

        out: list[int] = []
        for i in range(start, len(self.files)):
            if len(out) >= n:
                break
            try:
                self.rows([i])
            except ImageError as exc:
                warnings.warn(f"{exc}", SkippedImageWarning, stacklevel=2)
                continue
            out.append(i)
        return out

    def subset(self, rows: list[int]) -> tuple[torch.Tensor, dict[int, int]]:
        """``(inputs of the distinct rows, row -> index in them)``, in ``rows``' first-use order:
        a projection batch holds only the images its seeds come from, not the whole bank."""
        order = list(dict.fromkeys(rows))
        x = torch.stack([self.tensors[r] for r in order]).to(self.device)
        return x, {r: i for i, r in enumerate(order)}

    def example(self) -> torch.Tensor:
        if self.tensors:
            return self.tensors[0][None].to(self.device)
        return torch.zeros(1, 3, *self.pre.input_size, device=self.device)


def _init_distributed(ctx: convlens.ProbeContext) -> bool:
    """Under ``torchrun`` (WORLD_SIZE > 1): join the process group (gloo on CPU, nccl on CUDA,
    each rank on GPU ``LOCAL_RANK``). Returns True when this call created the group."""
    created, ctx.device = init_distributed(ctx.device, ctx.model)
    return created


def _activations(model: nn.Module, x: torch.Tensor, layers: list[str]) -> dict[str, torch.Tensor]:
    from convlens.engine import record

    with (
        torch.inference_mode(),
        record(
            model, layers, switches=False, trace=False, functional=any("/" in n for n in layers)
        ) as rec,
    ):
        model(x)
    return {n: rec[n].clone() for n in layers}


def _parse_neuron(text: str, n_images: int) -> tuple[int, int, int, int]:
    try:
        parts = [int(p) for p in text.replace(" ", "").split(",")]
    except ValueError:
        parts = []
    if len(parts) not in (2, 4):
        raise ConvlensError(f"--neuron {text!r}: expected IMAGE,CHANNEL,Y,X or IMAGE,CHANNEL")
    if not 0 <= parts[0] < n_images:
        raise ConvlensError(f"--neuron {text!r}: image index out of range 0..{n_images - 1}")
    if len(parts) == 2:
        parts += [-1, -1]
    return parts[0], parts[1], parts[2], parts[3]


def _entry(
    kind, rank, layer, layer_index, channel, y, x, activation, path, rf, hw, start, box, rule,
    array, row,
) -> dict[str, Any]:  # fmt: skip
    H, W = hw
    x0, y0, x1, y1 = (int(v) for v in box)
    clipped = [max(x0, 0), max(y0, 0), min(x1, W), min(y1, H)]
    local = rf is not None and not rf.is_global and y >= 0
    return {
        "kind": kind,
        "rank": rank,
        "image": str(path),
        "layer": layer,
        "layer_index": layer_index,
        "channel": int(channel),
        "y": int(y),
        "x": int(x),
        "activation": activation,
        "start_value": (max(activation, 0.0) if start == "activation" else 1.0),
        "rule": rule,
        "receptive_field": {
            "box": list(rf.box(y, x)) if local else None,
            "crop": [x0, y0, x1, y1],
            "clipped": clipped,
        },
        "array": array,
        "row": row,
    }


def _strongest(entries: list[dict[str, Any]], layer: str) -> str:
    top = [e for e in entries if e["kind"] == "topk" and e["layer"] == layer]
    if not top:
        return "-"
    e = max(top, key=lambda e: e["activation"])
    return f"channel {e['channel']} = {e['activation']:.4g} ({Path(e['image']).name})"


def check_map_layers(rec, layers: list[str], what: str) -> None:
    """Refuse, in one line naming it and its shape, a layer whose output is not a feature map
    ``[N, C, H, W]`` or a vector ``[N, F]`` (a token layer ``[N, L, C]``: ViT, Swin). ``what``
    says who needs maps (the deconv probe, the atlas)."""
    for lay in layers:
        shape = tuple(rec.layer(lay).output_shape or ())
        if len(shape) not in (2, 4):
            raise ConvlensError(
                f"layer {lay!r} outputs {shape}: {what} [N, C, H, W] feature maps (or [N, F] "
                "vectors); token layers are not supported"
            )


def _check_maps(model_name: str, rec, layers: list[str], requested: bool) -> None:
    """The deconv probe projects feature maps ``[N, C, H, W]`` (or fc vectors ``[N, F]``): a token
    layer ``[N, L, C]`` (ViT, Swin) is refused in one line naming it and its shape, and so is a
    token model when no layer was named (its only maps are the patch embedding's)."""
    check_map_layers(rec, layers, "the deconv probe projects")
    if not requested:
        tokens = [c for c in rec.leaves() if len(tuple(c.output_shape or ())) == 3]
        if tokens:
            t = tokens[0]
            raise ConvlensError(
                f"{model_name}: a token model ({t.name} outputs {tuple(t.output_shape)}): the "
                "deconv probe projects [N, C, H, W] feature maps; name a convolutional layer "
                "with --layer"
            )


def _announce(ctx: convlens.ProbeContext, choice: RuleChoice) -> None:
    """The rule and why, on the terminal; a warning when it barely sees the image."""
    fig = "n/a" if choice.figure is None else f"{choice.figure:.2f}"
    ctx.note(f"deconv {choice.layer}: rule {choice.rule} (image_specificity {fig}): "
             f"{choice.reason}")  # fmt: skip
    if choice.warning:
        warnings.warn(choice.warning, stacklevel=2)


def _shown_channels(topk, explicit, all_channels: bool, n: int) -> list[int]:
    """The channels projected at a layer: ``--channels`` as given (all for 'all'), else the
    ``n`` whose mean top-k activation is highest (ties: lower index)."""
    if explicit is not None:
        return [int(c) for c in explicit]
    if all_channels:
        return [int(c) for c in topk.channels]
    vals = topk.values.clone()
    filled = torch.isfinite(vals)
    mean = torch.where(filled, vals, torch.zeros_like(vals)).sum(1) / filled.sum(1).clamp(min=1)
    mean = torch.where(filled.any(1), mean, torch.full_like(mean, float("-inf")))
    order = sorted(range(len(topk.channels)), key=lambda i: (-float(mean[i]), i))[:n]
    return [int(topk.channels[i]) for i in order]


def _distinct(topk, shown: list[int]) -> int:
    """How many of the k slots are filled for the shown channels (the fewest)."""
    rows = [topk.channels.index(c) for c in shown if c in topk.channels]
    if not rows:
        return 0
    return int(min(int((topk.image[r] >= 0).sum()) for r in rows))


def _rf_share(rf, hw) -> float:
    if rf is None or rf.is_global:
        return 1.0
    return round(min(1.0, max(rf.size[0] / hw[0], rf.size[1] / hw[1])), 4)


def _to_uint8(a01: np.ndarray) -> np.ndarray:
    return (np.clip(a01, 0, 1) * 255 + 0.5).astype(np.uint8)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "layer"


def _inside(a: np.ndarray, e: dict[str, Any]) -> np.ndarray:
    """A cut ``[C, h, w]`` with NaN where the crop box lies outside the image."""
    x0, y0, _, _ = e["receptive_field"]["crop"]
    cx0, cy0, cx1, cy1 = e["receptive_field"]["clipped"]
    out = np.full(a.shape, np.nan)
    out[:, cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = a[
        :, cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0
    ]
    return out


def _unit_tiles(entries, arrays, name: str, channels: list[int], tile: int) -> list[UnitTiles]:
    by_channel: dict[int, list[dict[str, Any]]] = {}
    for e in entries:
        if e["kind"] == "topk" and e["array"] == f"{name}_projections":
            by_channel.setdefault(e["channel"], []).append(e)
    units = []
    projs, patches = arrays[f"{name}_projections"], arrays[f"{name}_patches"]
    for ch in channels:
        es = sorted(by_channel.get(ch, []), key=lambda e: e["rank"])
        if not es:
            continue
        ps = [
            resize(robust_stretch(_inside(projs[e["row"]], e), background=BACKGROUND), tile)
            for e in es
        ]
        qs = []
        for e in es:
            q = _inside(patches[e["row"]].astype(np.float64) / 255.0, e)
            qs.append(resize(np.where(np.isfinite(q), q, BACKGROUND), tile))
        units.append(UnitTiles(ch, ps, qs, [e["activation"] for e in es],
                               [Path(e["image"]).name for e in es]))  # fmt: skip
    return units


def _fig2_text(doc, ld, model_label: str, n_units: int, m: int) -> tuple[list[str], list[str]]:
    rf = ld["receptive_field"] or {}
    size = "global" if rf.get("global") else "x".join(str(v) for v in rf.get("size", []))
    crop = "x".join(str(v) for v in ld.get("crop_size", []))
    spec = ld["image_specificity"]
    spec_s = "n/a" if spec is None else f"{spec:.2f}"
    title = [
        f"Fig. 2 · {ld['layer']} of {model_label} · top-{m} activations of {n_units} units",
        f"rule: {ld['rule']} · image_specificity {spec_s} · receptive field {size} px"
        f" ({ld['rf_share'] * 100:.0f}% of the {doc['input_shape'][1]} px input), crop {crop} px"
        f" · {doc['mining']['images']} images mined ({doc['mining']['source']})",
    ]
    caption = [
        f"Each unit: its top-{m} activations from {m} different images, projected to pixels "
        f"with the {ld['rule']} rule (left; each tile contrast-normalised on its own: 0.5 + p/2s, "
        "s = 99.5th percentile of |p|, grey = 0) beside the image patches they come from "
        "(right). Tiles show the unit's receptive field (or, when it covers the whole input, "
        "where 90% of the projections' mass lies), clipped at the image border (light grey "
        "outside) and drawn at one scale. Numbers: activation values; names: source images.",
    ]
    if m < doc["k"]:
        caption.append(
            f"Only {m} distinct image(s) were available, fewer than the {doc['k']} asked for."
        )
    if spec is not None and spec > doc["image_specificity_threshold"]:
        caption.append(
            f"Warning: image_specificity {spec:.2f} — these projections are nearly the same for "
            "every image; they show the architecture more than the image."
        )
    return title, caption


def _poster_png(doc, arrays, fixed_inputs, pre, model_label: str):
    poster = doc["poster"]
    layers = poster["layers"]
    entries = [doc["projections"][i] for i in poster["entries"]]
    n_img = len(entries) // max(len(layers), 1)
    size = 112
    images01 = pre.denormalize(fixed_inputs).numpy()
    images, names, cells, labels = [], [], [], []
    for j in range(n_img):
        images.append(resize(images01[j], size))
        names.append(Path(entries[j]["image"]).name)
        row, lab = [], []
        for li in range(len(layers)):
            e = entries[li * n_img + j]
            p = arrays[e["array"]][e["row"]]  # already cut to its crop
            row.append(resize(robust_stretch(_inside(p, e), background=BACKGROUND), size))
            lab.append(f"#{e['channel']} {e['activation']:.3g}")
        cells.append(row)
        labels.append(lab)
    columns = []
    for li, (lay, rule) in enumerate(zip(layers, poster["rules"], strict=True)):
        e = entries[li * n_img]
        crop = e["receptive_field"]["crop"]
        room = int(size / 4.6)  # characters of a 6 pt line in one column
        short = lay if len(lay) <= room else lay[: room - 1] + "…"
        columns.append(f"layer {li + 1}\n{short}\n{rule}, crop {crop[2] - crop[0]} px")
    title = [
        f"Strongest activation per layer · {model_label}",
        "each cell: the strongest unit (#channel, activation) of that layer in that image, "
        "projected to pixels",
    ]
    caption = [
        "Columns: layers shallow to deep (" + ", ".join(layers) + ") with the backward rule "
        "used at each; each projection is cut to its unit's receptive field (or where 90% of "
        "the projections' mass lies, when the field covers the whole input), the crop's side in "
        "input pixels in the header, and contrast-normalised on its own (0.5 + p/2s, s = 99.5th "
        "percentile of |p|; grey = 0; light grey: outside the image)."
    ]
    return poster_canvas(images, names, columns, cells, labels, title, caption)


def _fig6_text(label: str, w: torch.Tensor, diag: dict[str, Any] | None):
    n, cin, kh, kw = (int(v) for v in w.shape)
    layer = diag["layer"] if diag else "first conv"
    title = [f"Fig. 6 · first-layer filters of {label}",
             f"{layer}: {n} filters of {cin}x{kh}x{kw} (RGB when 3 input channels)"]  # fmt: skip
    dead = list(diag["dead"]) if diag else []
    dom = None
    caption = []
    if diag:
        d = diag["dominating"]
        if d["dominates"]:
            dom = int(d["filter"])
        caption.append(
            f"Left: every filter on one scale for the layer (a dominating filter stands out); "
            f"right: each on its own scale. Numbers: filter index. Red frame: dead "
            f"({len(dead)}: RMS or mean |activation| below 10% of the median"
            + (f"; #{', #'.join(str(i) for i in dead[:12])}" if dead else "")
            + f"). Strongest filter #{d['filter']} at {d['ratio_to_median']:.2f}x the median RMS"
            + (" (orange frame: dominates, >= 3x)." if d["dominates"] else " (none dominates).")
        )
    return title, caption, dead, dom


def _rules_table(layers: list[dict[str, Any]]) -> str:
    rows = []
    for ld in layers:
        rc = ld["rule_choice"]
        figs = ", ".join(
            f"{k} {'n/a' if v is None else f'{v:.2f}'}"
            for k, v in rc["image_specificity_by_rule"].items()
        )
        warn = ' class="warn"' if rc["warning"] else ""
        rows.append(
            f"<tr{warn}><td><code>{esc(ld['layer'])}</code></td><td>{ld['rf_share'] * 100:.0f}%"
            f"</td><td><b>{esc(ld['rule'])}</b></td><td>{esc(figs)}</td>"
            f"<td>{esc(rc['reason'])}</td></tr>"
        )
    return (
        "<table><tr><th>layer</th><th>receptive field (share of input)</th><th>rule</th>"
        "<th>image_specificity</th><th>why</th></tr>" + "".join(rows) + "</table>"
    )


def _figure(src: str, caption: str) -> str:
    return f'<figure><img src="{esc(src)}" alt=""><figcaption>{caption}</figcaption></figure>'


def _filters_table(rows: list[tuple[str, dict[str, Any] | None]]) -> str:
    body = []
    for label, f in rows:
        if not f:
            continue
        b = f["bands"]["mean"]
        dom = f["dominating"]
        body.append(
            f"<tr><td>{esc(label)}</td><td>{esc(f['layer'])} {esc(tuple(f['shape']))}</td>"
            f"<td>{f['median_rms']:.4g}</td><td>{len(f['dead'])}</td>"
            f"<td>#{dom['filter']} ({dom['ratio_to_median']:.2f}x median"
            f"{', dominates' if dom['dominates'] else ''})</td>"
            f"<td>{b['low']:.2f} / {b['mid']:.2f} / {b['high']:.2f}</td></tr>"
        )
    return (
        "<table><tr><th>model</th><th>layer 1</th><th>median filter RMS</th><th>dead filters"
        "</th><th>strongest filter</th><th>energy low / mid / high</th></tr>"
        + "".join(body)
        + "</table><p><small>Dead: filter RMS below 10% of the median, or mean "
        "|activation| below 10% of the median channel's. Dominating: RMS at least 3x the median. "
        "Bands: radial frequency below 1/3, 1/3–2/3, above 2/3 of Nyquist.</small></p>"
    )
