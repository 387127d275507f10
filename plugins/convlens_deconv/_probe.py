"""``convlens probe deconv``: the probe that wires mining, projection and figures together.

Run order (Section 2.1, Section 4, Figs. 2, 4, 6 and the poster's layer-by-layer row):

1. mine the top-k activations of the chosen channels of ``--layer`` over the images (streaming;
   sharded and merged under ``torchrun``);
2. project every one of them to pixels in batched passes (plus any ``--neuron``), and for the
   poster the strongest activation of each layer in the first few images;
3. first-layer filter diagnostics (Fig. 6), optionally against a second model (``--compare``);
4. with ``--checkpoints``, the feature evolution grid (Fig. 4);
5. ``deconv.json`` + ``deconv.npz`` (schema in ``docs/probes/deconv.md``) and the PNG figures.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import convlens
from convlens.data import Preprocess, find_images, load_image
from convlens.engine import resolve_layer, top_conv_layer
from convlens.errors import ConvlensError
from convlens.io import save_npz, write_json
from convlens.options import parse_int_list, parse_str_list
from convlens.render import grid, save_png
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
from convlens_deconv._forward import trace_to
from convlens_deconv._mining import mine_topk
from convlens_deconv._project import Seed, layer_activation, project, strongest_seeds
from convlens_deconv._render import (
    evolution_grid,
    fig2_grid,
    filter_tile,
    patch_tile,
    poster_grid,
    projection_tile,
    resize,
    seed_box,
)

__all__ = ["DeconvProbe"]

DEFAULT_CHANNELS = 16


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
            "Layer to visualise (alias such as conv5, module name "
            "or parent/op). Default: the model's top conv layer.",
        ),
        convlens.Option(
            "channels",
            str,
            None,
            f"Channels of the layer: '0-15,20' or 'all'. Default: the first {DEFAULT_CHANNELS}.",
        ),
        convlens.Option("top", int, 9, "Top-k activations per channel across the images (Fig. 2)."),
        convlens.Option("per_image", int, 1, "At most this many of a channel's top-k per image."),
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
            "Also project IMAGE,CHANNEL,Y,X (IMAGE: index in the "
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
            "Comma-separated layers for the poster. "
            "Default: conv1..convK aliases, else timm's feature stages.",
        ),
        convlens.Option(
            "poster_images",
            int,
            6,
            "Images (the first ones) for the poster, the "
            "filter activations, --compare and --checkpoints.",
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
        convlens.Option("batch_size", int, 16, "Images per forward pass while mining."),
        convlens.Option(
            "render_channels",
            int,
            16,
            "At most this many channels drawn in the Fig. 2 grid (all are in deconv.json/npz).",
        ),
    )

    # ------------------------------------------------------------------------------------------
    def run(self, ctx: convlens.ProbeContext) -> convlens.ProbeResult:
        o = ctx.options
        for name in ("top", "per_image", "poster_images", "batch_size", "render_channels"):
            if o[name] < 1:
                raise ConvlensError(f"option --{name.replace('_', '-')}: must be >= 1")
        model = ctx.model
        pre = ctx.preprocess or Preprocess.for_model(model)
        ctx.preprocess = pre
        layer = o["layer"] or top_conv_layer(model)
        resolve_layer(model, layer)
        timings: dict[str, float] = {}
        created_group = _init_distributed(ctx)
        files = find_images(ctx.images)
        info = getattr(model, "convlens_info", None)

        # 1. mining -----------------------------------------------------------------------------
        channels = parse_int_list(o["channels"], "channels") if o["channels"] else None
        all_channels = isinstance(o["channels"], str) and o["channels"].strip().lower() == "all"
        if channels is None and not all_channels:
            n_ch = _channel_count(model, layer, pre, ctx.device)
            channels = list(range(min(DEFAULT_CHANNELS, n_ch)))
        t = time.perf_counter()
        with ctx.progress(f"mining top-{o['top']} at {layer}", len(files)) as advance:
            topk = mine_topk(
                model,
                layer,
                ctx.images,
                channels=channels,
                k=o["top"],
                per_image=o["per_image"],
                preprocess=pre,
                batch_size=o["batch_size"],
                device=ctx.device,
                progress=advance,
            )
        timings["mining_s"] = time.perf_counter() - t
        if created_group:
            import torch.distributed as dist

            dist.destroy_process_group()

        bank = _InputBank(files, pre, ctx.device)
        entries: list[dict[str, Any]] = []
        proj_list: list[torch.Tensor] = []
        rf_main = trace_to(model, bank.example(), layer).rf(layer)
        hw = tuple(pre.input_size)
        proj_info: dict[str, Any] = {}

        # 2a. top-k projections --------------------------------------------------------------
        t = time.perf_counter()
        found = topk.entries()
        if found:
            rows = bank.rows([e["image"] for e in found])
            seeds = [
                Seed(r, e["channel"], e["y"], e["x"]) for r, e in zip(rows, found, strict=True)
            ]
            with ctx.progress(f"projecting {len(seeds)} activations", len(seeds)) as advance:
                res = project(
                    model,
                    bank.tensor(),
                    layer,
                    seeds,
                    method=o["method"],
                    mode=o["mode"],
                    start=o["start"],
                    progress=advance,
                )
            proj_info = res.to_dict()
            for e, r, p, a in zip(found, rows, res.projections, res.activations, strict=True):
                entries.append(
                    _entry(
                        "topk",
                        e["rank"],
                        layer,
                        e["channel"],
                        e["y"],
                        e["x"],
                        float(a),
                        files[e["image"]],
                        r,
                        rf_main,
                        hw,
                        o["start"],
                    )
                )
                proj_list.append(p.detach().float().cpu())
        # 2b. chosen neurons -----------------------------------------------------------------
        neurons = [_parse_neuron(text, len(files)) for text in o["neuron"] or []]
        if neurons:
            rows = bank.rows([n[0] for n in neurons])
            seeds = [Seed(r, c, y, x) for r, (_, c, y, x) in zip(rows, neurons, strict=True)]
            res = project(
                model,
                bank.tensor(),
                layer,
                seeds,
                method=o["method"],
                mode=o["mode"],
                start=o["start"],
            )
            proj_info = proj_info or res.to_dict()
            for (img, c, y, x), r, p, a in zip(
                neurons, rows, res.projections, res.activations, strict=True
            ):
                entries.append(
                    _entry(
                        "neuron",
                        None,
                        layer,
                        c,
                        y,
                        x,
                        float(a),
                        files[img],
                        r,
                        rf_main,
                        hw,
                        o["start"],
                    )
                )
                proj_list.append(p.detach().float().cpu())
        timings["projection_s"] = time.perf_counter() - t

        # 2c. poster: the strongest activation of each layer ---------------------------------
        poster_idx = bank.first_readable(o["poster_images"])
        poster: dict[str, Any] = {}
        t = time.perf_counter()
        if o["poster"] and poster_idx:
            layers = parse_str_list(o["poster_layers"]) or default_poster_layers(model, layer)
            rows = bank.rows(poster_idx)
            x = bank.tensor()[rows]
            poster = {
                "layers": layers,
                "images": [str(files[i]) for i in poster_idx],
                "entries": [],
            }
            acts = _activations(model, x, layers)  # one inference pass for every layer
            for lay in layers:
                seeds = strongest_seeds(acts[lay])
                with ctx.progress(f"poster: {lay}", len(seeds)) as advance:
                    res = project(
                        model,
                        x,
                        lay,
                        seeds,
                        method=o["method"],
                        mode=o["mode"],
                        start=o["start"],
                        progress=advance,
                    )
                for s, p, a in zip(seeds, res.projections, res.activations, strict=True):
                    entries.append(
                        _entry(
                            "poster",
                            None,
                            lay,
                            s.channel,
                            s.y,
                            s.x,
                            float(a),
                            files[poster_idx[s.image]],
                            rows[s.image],
                            res.receptive_field,
                            hw,
                            o["start"],
                            method=res.method,
                        )
                    )
                    proj_list.append(p.detach().float().cpu())
                    poster["entries"].append(len(entries) - 1)
        timings["poster_s"] = time.perf_counter() - t

        # 3. filters (Fig. 6) -----------------------------------------------------------------
        t = time.perf_counter()
        fixed_rows = bank.rows(poster_idx)  # load first: bank.tensor() holds what is loaded
        x_fixed = bank.tensor()[fixed_rows] if poster_idx else bank.example()
        filters = filters_for(model, x_fixed)
        compare: dict[str, Any] | None = None
        if o["compare"]:
            compare = compare_models(ctx, model, o, [files[i] for i in poster_idx] or files[:1])
        timings["filters_s"] = time.perf_counter() - t

        # 4. feature evolution (Fig. 4) -------------------------------------------------------
        evolution: dict[str, Any] | None = None
        evo_proj = None
        if o["checkpoints"]:
            t = time.perf_counter()
            evolution, evo_proj, evo_fields = evolution_from_checkpoints(
                model, o, layer, x_fixed, topk.channels, fixed_rows
            )
            evolution["fields"] = evo_fields
            timings["evolution_s"] = time.perf_counter() - t

        # 5. outputs --------------------------------------------------------------------------
        inputs = bank.tensor().detach().float().cpu()
        projections = torch.stack(proj_list) if proj_list else torch.zeros(0, *inputs.shape[1:])
        arrays = {"projections": projections.numpy(), "inputs": inputs.numpy()}
        compare_weight = None
        if compare is not None:
            arrays["compare_projections"] = compare.pop("_projections")
            arrays["compare_inputs"] = compare.pop("_inputs")
            compare_weight = compare.pop("_weight_ref")
        if evo_proj is not None:
            arrays["evolution_projections"] = evo_proj.numpy()
        npz = save_npz(ctx.out_dir / "deconv.npz", **arrays)
        ref = resolve_layer(model, layer)
        doc = {
            "probe": self.name,
            "paper": self.paper,
            "model": ctx.model_name,
            "weights": getattr(info, "weights", None),
            "random_weights": bool(getattr(info, "random_init", False)),
            "seed": ctx.seed,
            "layer": layer,
            "layer_resolved": ref.key,
            "receptive_field": rf_main.to_dict() if rf_main else None,
            "method": proj_info.get("method"),
            "method_reason": proj_info.get("reason"),
            "rectified_ops": proj_info.get("modified_ops", {}),
            "mode": o["mode"],
            "start": o["start"],
            "contrast_stretch": "per projection: 0.5 + p / (2 max|p|) over the displayed crop",
            "k": o["top"],
            "per_image": o["per_image"],
            "channels": topk.channels,
            "mining": {
                "images": topk.n_images,
                "candidates": len(files),
                "world_size": topk.world_size,
                "map_shape": list(topk.map_shape),
            },
            "input_shape": list(inputs.shape[1:]),
            "preprocess": pre.to_dict(),
            "images": [str(p) for p in bank.paths()],
            "projections": entries,
            "poster": poster or None,
            "filters": filters,
            "compare": compare,
            "evolution": jsonable_evolution(evolution),
            "timings_s": {k: round(v, 3) for k, v in timings.items()},
        }
        js = write_json(ctx.out_dir / "deconv.json", doc)
        summary = {
            "layer": layer,
            "method": doc["method"],
            "channels": len(topk.channels),
            "images mined": topk.n_images,
            "projections": len(entries),
            "strongest": _strongest(entries),
            "layer-1 dead filters": len(filters["dead"]) if filters else None,
            **{k: round(v, 2) for k, v in timings.items()},
        }
        data = {
            "doc": doc,
            "projections": projections,
            "inputs": inputs,
            "rf": rf_main,
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
        pre = ctx.preprocess
        images01 = pre.denormalize(d["inputs"]).numpy() if len(d["inputs"]) else None
        out = ctx.out_dir
        figures: list[str] = []
        html: list[str] = []
        if doc["random_weights"]:
            html.append(
                '<p class="warn">Random weights: these projections show the '
                "architecture's geometry, not learned features.</p>"
            )
        html.append(
            f"<p>Layer <code>{esc(doc['layer'])}</code> (<code>{esc(doc['layer_resolved'])}</code>"
            f"), deconvnet form <b>{esc(doc['method'])}</b>"
            + (f" ({esc(doc['method_reason'])})" if doc["method_reason"] else "")
            + f", mode <b>{esc(doc['mode'])}</b>, start <b>{esc(doc['start'])}</b>; "
            f"{doc['mining']['images']} image(s) mined, {len(doc['channels'])} channel(s).</p>"
        )
        # Fig. 2 grid
        topk = [i for i, e in enumerate(doc["projections"]) if e["kind"] == "topk"]
        if topk and images01 is not None:
            tile = 64
            by_channel: dict[int, list[int]] = {}
            for i in topk:
                by_channel.setdefault(doc["projections"][i]["channel"], []).append(i)
            blocks = []
            for ch in list(by_channel)[: ctx.options["render_channels"]]:
                ps, qs = [], []
                for i in by_channel[ch]:
                    e = doc["projections"][i]
                    box = tuple(e["receptive_field"]["crop"])
                    ps.append(projection_tile(d["projections"][i].numpy(), box, tile))
                    qs.append(patch_tile(images01[e["input_index"]], box, tile))
                blocks.append((ps, qs))
            save_png(fig2_grid(blocks, tile, per_row=2, k=doc["k"]), out / "fig2_topk.png")
            figures.append("deconv/fig2_topk.png")
            html.append(
                _figure(
                    "deconv/fig2_topk.png",
                    f"Fig. 2: top-{doc['k']} activations of {len(blocks)} channel(s) "
                    f"of {esc(doc['layer'])} projected to pixels (left, each contrast-"
                    "stretched on its own) and the image patches of their receptive "
                    "fields (right); channels "
                    + esc(", ".join(str(c) for c in list(by_channel)[: len(blocks)])),
                )
            )
        # poster
        poster = doc.get("poster")
        if poster and images01 is not None and poster["entries"]:
            nlay = len(poster["layers"])
            rows: list[list[np.ndarray]] = []
            size = 112
            entries = poster["entries"]
            n_img = len(entries) // max(nlay, 1)
            for j in range(n_img):
                e0 = doc["projections"][entries[j]]
                row = [resize(images01[e0["input_index"]], size)]
                for li in range(nlay):
                    i = entries[li * n_img + j]
                    row.append(
                        projection_tile(
                            d["projections"][i].numpy(), (0, 0, *doc["input_shape"][::-1][:2]), size
                        )
                    )
                rows.append(row)
            save_png(poster_grid(rows), out / "poster_layers.png")
            figures.append("deconv/poster_layers.png")
            html.append(
                _figure(
                    "deconv/poster_layers.png",
                    "The strongest activation of each layer ("
                    + esc(", ".join(poster["layers"]))
                    + ") in each image, projected to pixels (whole image, each "
                    "contrast-stretched on its own); first column: the image.",
                )
            )
        # Fig. 6 filters (and the compared model's)
        tiles = [("fig6_filters.png", d["filters_weight"], "this model")]
        if doc["compare"]:
            tiles.append(("fig6_filters_compare.png", d["compare_weight"], doc["compare"]["model"]))
        for fname, w, label in tiles:
            if w is None:
                continue
            a, b = filter_tile(w, per_filter=False), filter_tile(w)
            save_png(np.concatenate([a, np.ones((a.shape[0], 12, 3)), b], axis=1), out / fname)
            figures.append(f"deconv/{fname}")
            html.append(
                _figure(
                    f"deconv/{fname}",
                    f"Fig. 6: first-layer filters of {esc(label)} on one scale for "
                    "the layer (left: a dominating filter stands out) and each on its "
                    "own scale (right).",
                )
            )
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
                save_png(grid(panels, 1, pad=6, pad_value=0.85), out / "fig6_compare_layer2.png")
                figures.append("deconv/fig6_compare_layer2.png")
                html.append(
                    _figure(
                        "deconv/fig6_compare_layer2.png",
                        f"Fig. 6(d)/(e): layer-2 features of this model "
                        f"({esc(c['main_layer2']['layer'])}, top) and of {esc(c['model'])} "
                        f"({esc(c['compare_layer2']['layer'])}, bottom): the strongest activation of "
                        "the first channels across the images, projected. Mean high-frequency share "
                        f"of the projections: {c['main_layer2']['bands_mean']['high']:.3f} vs "
                        f"{c['compare_layer2']['bands_mean']['high']:.3f}.",
                    )
                )
        # Fig. 4 evolution
        if doc["evolution"] and d["evolution_projections"] is not None:
            ev = doc["evolution"]
            fields = d["evolution_fields"]
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
            save_png(evolution_grid(cells), out / "fig4_evolution.png")
            figures.append("deconv/fig4_evolution.png")
            html.append(
                _figure(
                    "deconv/fig4_evolution.png",
                    "Fig. 4: the strongest activation of channels "
                    + esc(", ".join(str(c) for c in ev["channels"]))
                    + " across the images at each checkpoint ("
                    + esc(", ".join(ev["labels"]))
                    + "), projected (left of each "
                    "pair) beside its image patch.",
                )
            )
        html.append(
            "<p>Data: <code>deconv/deconv.json</code> (every projection: image, layer, "
            "channel, position, activation, receptive field) and "
            "<code>deconv/deconv.npz</code> (<code>projections</code>, <code>inputs</code>"
            ").</p>"
        )
        return convlens.ReportSection(
            "Deconvnet projections (Section 2.1, Figs. 2, 4, 6)", "".join(html), figures, order=20
        )


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


class _InputBank:
    """The preprocessed images the projections belong to (``inputs`` of deconv.npz), loaded on
    demand from the file list and kept in first-use order."""

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

    def first_readable(self, n: int) -> list[int]:
        """Indices of the first ``n`` files that load (unreadable ones skipped with a warning,
        as the mining pass does)."""
        import warnings

        from convlens.data import SkippedImageWarning
        from convlens.errors import ImageError

        out: list[int] = []
        for i in range(len(self.files)):
            if len(out) >= n:
                break
            try:
                self.rows([i])
            except ImageError as exc:
                warnings.warn(f"{exc}", SkippedImageWarning, stacklevel=2)
                continue
            out.append(i)
        return out

    def tensor(self) -> torch.Tensor:
        if not self.tensors:
            return torch.zeros(0, 3, *self.pre.input_size, device=self.device)
        return torch.stack(self.tensors).to(self.device)

    def example(self) -> torch.Tensor:
        if self.tensors:
            return self.tensors[0][None].to(self.device)
        return torch.zeros(1, 3, *self.pre.input_size, device=self.device)

    def paths(self) -> list[Path]:
        order = sorted(self.index.items(), key=lambda kv: kv[1])
        return [self.files[i] for i, _ in order]


def _init_distributed(ctx: convlens.ProbeContext) -> bool:
    """Under ``torchrun`` (WORLD_SIZE > 1): join the process group (gloo on CPU, nccl on CUDA,
    each rank on GPU ``LOCAL_RANK``). Returns True when this call created the group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return False
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    if ctx.device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        ctx.device = torch.device("cuda", local)
        torch.cuda.set_device(ctx.device)
        ctx.model.to(ctx.device)
    dist.init_process_group("nccl" if ctx.device.type == "cuda" else "gloo")
    return True


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


def _channel_count(model: nn.Module, layer: str, pre: Preprocess, device: torch.device) -> int:
    x = torch.zeros(1, 3, *pre.input_size, device=device)
    return int(layer_activation(model, x, layer).shape[1])


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
    kind, rank, layer, channel, y, x, activation, path, row, rf, hw, start, method=None
) -> dict[str, Any]:
    box, clipped = seed_box(rf, y, x, hw)
    e = {
        "kind": kind,
        "rank": rank,
        "image": str(path),
        "input_index": row,
        "layer": layer,
        "channel": int(channel),
        "y": int(y),
        "x": int(x),
        "activation": activation,
        "start_value": (max(activation, 0.0) if start == "activation" else 1.0),
        "receptive_field": {
            "box": list(rf.box(y, x)) if rf is not None and not rf.is_global and y >= 0 else None,
            "clipped": list(clipped),
            "crop": list(box),
        },
    }
    if method is not None:
        e["method"] = method
    return e


def _strongest(entries: list[dict[str, Any]]) -> str:
    top = [e for e in entries if e["kind"] == "topk"]
    if not top:
        return "-"
    e = max(top, key=lambda e: e["activation"])
    return f"channel {e['channel']} = {e['activation']:.4g} ({Path(e['image']).name})"


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
