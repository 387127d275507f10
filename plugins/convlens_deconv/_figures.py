"""The deconv probe's Fig. 4 and Fig. 6 pieces and the poster's layer choice.

* layer 1 and layer 2 of any convnet (the first Conv2d and its rectified output; the ``conv2``
  alias or the rectified output of the second Conv2d), first-layer filter diagnostics (Fig. 6
  (a)-(c), :mod:`convlens_deconv._filters`);
* the model comparison (``--compare``: Fig. 6 (b)/(d) against (c)/(e)), layer-2 projections and
  their spatial-frequency bands;
* feature evolution across checkpoints (``--checkpoints``: Fig. 4);
* the poster's default layers.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import convlens
from convlens.data import Preprocess, load_image
from convlens.engine import trace_model
from convlens.errors import ConvlensError
from convlens.options import parse_int_list
from convlens.render import contrast_stretch
from convlens_deconv._chain import _RECTIFIER_MODULES
from convlens_deconv._evolution import evolve
from convlens_deconv._filters import band_energies, filter_diagnostics
from convlens_deconv._project import Seed, layer_activation, project
from convlens_deconv._render import crop, seed_box

__all__ = [
    "default_poster_layers",
    "first_conv_layer",
    "second_layer",
    "filters_for",
    "first_conv_weight",
    "compare_models",
    "evolution_from_checkpoints",
    "jsonable_evolution",
    "stretch_crop",
]


def _leaf_convs(model: nn.Module, x: torch.Tensor):
    rec = trace_model(model, x[:1])
    modules = dict(model.named_modules())
    convs = [
        c
        for c in rec.leaves()
        if c.kind == "module" and isinstance(modules.get(c.module), nn.Conv2d)
    ]
    return rec, modules, convs


def first_conv_layer(model: nn.Module, x: torch.Tensor) -> tuple[str, str] | None:
    """``(conv module name, layer whose activation shows its units)``: the first Conv2d and the
    first rectifier after it (or the conv itself)."""
    rec, modules, convs = _leaf_convs(model, x)
    if not convs:
        return None
    return convs[0].module, _activation_after(rec, modules, convs[0])


def second_layer(model: nn.Module, x: torch.Tensor) -> str | None:
    """Layer 2: the ``conv2`` alias, else the rectified output of the second Conv2d."""
    if "conv2" in (getattr(model, "convlens_aliases", {}) or {}):
        return "conv2"
    rec, modules, convs = _leaf_convs(model, x)
    if len(convs) < 2:
        return None
    return _activation_after(rec, modules, convs[1])


def _activation_after(rec, modules, conv) -> str:
    for c in rec.leaves():
        if c.index <= conv.index:
            continue
        if c.kind == "module" and isinstance(modules.get(c.module), nn.Conv2d):
            break
        if c.kind == "module" and isinstance(modules.get(c.module), _RECTIFIER_MODULES):
            return c.name
        if c.kind == "function" and c.type in ("relu", "relu6", "hardtanh", "silu", "gelu"):
            return c.name
    return conv.name


def default_poster_layers(model: nn.Module, top: str) -> list[str]:
    """The poster's layers: ``conv1``…``convK`` aliases; else the model's ``feature_info``
    stages (timm); else the top conv layer alone. The top conv layer is always last."""
    aliases = getattr(model, "convlens_aliases", {}) or {}
    convs = sorted((int(a[4:]), a) for a in aliases if a.startswith("conv") and a[4:].isdigit())
    layers = [a for _, a in convs]
    if not layers:
        info = getattr(model, "feature_info", None)
        for f in info or []:
            name = f.get("module") if isinstance(f, dict) else getattr(f, "module", None)
            if name:
                layers.append(name)
    if top not in layers:
        layers.append(top)
    return layers


def first_conv_weight(model: nn.Module) -> torch.Tensor | None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.weight.detach().cpu()
    return None


def filters_for(model: nn.Module, x: torch.Tensor) -> dict[str, Any] | None:
    found = first_conv_layer(model, x)
    if found is None:
        return None
    conv, act_layer = found
    weight = model.get_submodule(conv).weight
    act = layer_activation(model, x, act_layer)
    out = filter_diagnostics(weight, act)
    out["layer"] = conv
    out["activation_layer"] = act_layer
    return out


def stretch_crop(p: np.ndarray, box) -> np.ndarray:

    return contrast_stretch(crop(p, tuple(box), 0.0))


def _layer2_block(
    model: nn.Module, x: torch.Tensor, o: dict[str, Any]
) -> tuple[dict, torch.Tensor]:
    lay = second_layer(model, x)
    if lay is None:
        return {
            "layer": None,
            "indices": [],
            "crops": [],
            "bands_mean": {"low": 0.0, "mid": 0.0, "high": 0.0},
        }, None
    act = layer_activation(model, x, lay)
    a = act if act.dim() == 4 else act[:, :, None, None]
    n_ch = min(16, a.shape[1])
    seeds = []
    for ch in range(n_ch):
        flat = int(a[:, ch].reshape(-1).argmax())
        img, pos = divmod(flat, a.shape[2] * a.shape[3])
        seeds.append(Seed(img, ch, *divmod(pos, a.shape[3])))
    res = project(model, x, lay, seeds, method=o["method"], mode=o["mode"], start=o["start"])
    rf = res.receptive_field
    hw = tuple(x.shape[-2:])
    crops = [list(seed_box(rf, s.y, s.x, hw)[0]) for s in seeds]
    arrays = [
        crop(p.detach().float().cpu().numpy(), tuple(b), 0.0)
        for p, b in zip(res.projections, crops, strict=True)
    ]
    bands = np.stack([band_energies(a[None])[0] for a in arrays]) if arrays else np.zeros((0, 3))
    block = {
        "layer": lay,
        "method": res.method,
        "channels": [s.channel for s in seeds],
        "activations": [float(v) for v in res.activations],
        "crops": crops,
        "bands_per_projection": [[float(v) for v in row] for row in bands],
        "bands_mean": {
            k: float(bands[:, j].mean()) if len(bands) else 0.0
            for j, k in enumerate(("low", "mid", "high"))
        },
    }
    return block, res.projections.detach().float().cpu()


def compare_models(
    ctx: convlens.ProbeContext, model: nn.Module, o: dict[str, Any], files: list[Path]
) -> dict[str, Any]:
    """Fig. 6 (b)–(e): layer-1 filters and layer-2 projections of this model and another."""
    from convlens.runner import load_model

    other, label = load_model(o["compare"], weights=o["compare_weights"], device=ctx.device)
    pre_o = Preprocess.for_model(other)
    pre_m = ctx.preprocess
    xm = torch.stack([pre_m(load_image(f)) for f in files]).to(ctx.device)
    xo = torch.stack([pre_o(load_image(f)) for f in files]).to(ctx.device)
    main_block, main_proj = _layer2_block(model, xm, o)
    cmp_block, cmp_proj = _layer2_block(other, xo, o)
    info = getattr(other, "convlens_info", None)
    out = {
        "model": label,
        "weights": str(o["compare_weights"])
        if o["compare_weights"]
        else getattr(info, "weights", None),
        "random_weights": bool(getattr(info, "random_init", False)),
        "images": [str(f) for f in files],
        "filters": filters_for(other, xo),
        "main_layer2": main_block,
        "compare_layer2": cmp_block,
        "_weight_ref": first_conv_weight(other),
        "_inputs": xo.detach().float().cpu().numpy(),
    }
    # main-model layer-2 projections live in the compare arrays too (one place for the figure)
    projs = [t for t in (main_proj, cmp_proj) if t is not None]
    n_main = 0 if main_proj is None else len(main_proj)
    main_block["indices"] = list(range(n_main))
    cmp_block["indices"] = list(range(n_main, n_main + (0 if cmp_proj is None else len(cmp_proj))))
    out["_projections"] = (
        torch.cat(projs).numpy() if projs else np.zeros((0, 3, *pre_m.input_size), np.float32)
    )
    return out


def evolution_from_checkpoints(
    model: nn.Module,
    o: dict[str, Any],
    layer: str,
    x: torch.Tensor,
    channels: list[int],
    rows: list[int],
):
    from convlens.models import load_weights

    wanted = parse_int_list(o["evolution_channels"], "evolution channels") or channels[:8]
    snapshots = []
    for path in o["checkpoints"]:
        if not Path(path).exists():
            raise ConvlensError(f"{path}: no such checkpoint")
        m = copy.deepcopy(model)
        load_weights(m, path)
        snapshots.append((Path(path).stem, m.eval()))
    cells, projs, fields = evolve(
        snapshots, x, layer, wanted, method=o["method"], mode=o["mode"], start=o["start"]
    )
    ev = {
        "layer": layer,
        "labels": [s[0] for s in snapshots],
        "channels": wanted,
        "checkpoints": [str(p) for p in o["checkpoints"]],
        "cells": cells,
        "input_rows": list(rows),
    }
    return ev, projs, fields


def jsonable_evolution(ev: dict[str, Any] | None) -> dict[str, Any] | None:
    if ev is None:
        return None
    out = {k: v for k, v in ev.items() if k != "fields"}
    out["receptive_fields"] = [f.to_dict() if f else None for f in ev.get("fields", [])]
    return out
