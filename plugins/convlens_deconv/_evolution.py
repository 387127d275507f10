"""Fig. 4: feature evolution during training.

"The progression during training of the strongest activation (across all training examples)
within a given feature map projected back to pixel space" (Section 4, Fig. 4). Given snapshots of
one model (checkpoints at several epochs) and a fixed image set, :func:`feature_evolution` finds,
for each snapshot and each chosen channel, the strongest activation across the images, projects it
with the deconvnet and draws one grid: rows = channels, columns = snapshots; each cell shows the
projection beside the image patch it came from (a "sudden jump in appearance" is a change of the
image the strongest activation comes from — the patch makes that visible).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from convlens.data import Preprocess
from convlens.errors import ConvlensError
from convlens.render import save_png
from convlens_deconv._project import Seed, layer_activation, project
from convlens_deconv._render import evolution_grid, patch_tile, projection_tile, seed_box

__all__ = ["feature_evolution", "evolve"]


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def evolve(
    snapshots: Sequence[tuple[str, nn.Module]],
    inputs: torch.Tensor,
    layer: str,
    channels: Sequence[int],
    **project_kwargs: Any,
) -> tuple[list[list[dict[str, Any]]], torch.Tensor, list[Any]]:
    """The computation behind :func:`feature_evolution`: ``(cells, projections, fields)`` with
    ``cells[c][s]`` = ``{image, y, x, activation, method}`` for channel ``channels[c]`` at snapshot
    ``s``, ``projections`` ``[C, S, 3, H, W]`` and each snapshot's receptive field at ``layer``."""
    if not snapshots:
        raise ConvlensError("feature evolution: no snapshots given")
    channels = [int(c) for c in channels]
    if not channels:
        raise ConvlensError("feature evolution: no channels given")
    cells: list[list[dict[str, Any]]] = [[] for _ in channels]
    projs = torch.zeros(len(channels), len(snapshots), *inputs.shape[1:])
    fields = []
    for s, (label, model) in enumerate(snapshots):
        model.eval()
        x = inputs.to(_device(model))
        act = layer_activation(model, x, layer)
        if act.dim() == 2:
            act = act[:, :, None, None]
        n, c, h, w = act.shape
        bad = [ch for ch in channels if not 0 <= ch < c]
        if bad:
            raise ConvlensError(f"snapshot {label!r}: layer {layer!r} has no channel {bad[0]}")
        seeds = []
        for ch in channels:
            flat = int(act[:, ch].reshape(-1).argmax())
            img, pos = divmod(flat, h * w)
            y, xx = divmod(pos, w)
            seeds.append(Seed(img, ch, y, xx))
        res = project(model, x, layer, seeds, **project_kwargs)
        projs[:, s] = res.projections.detach().float().cpu()
        fields.append(res.receptive_field)
        for i, sd in enumerate(seeds):
            cells[i].append(
                {
                    "snapshot": label,
                    "image": sd.image,
                    "y": sd.y,
                    "x": sd.x,
                    "activation": float(res.activations[i]),
                    "method": res.method,
                }
            )
    return cells, projs, fields


def feature_evolution(
    snapshots: Sequence[tuple[str, nn.Module]],
    inputs: torch.Tensor,
    layer: str,
    channels: Sequence[int],
    out_png: Path,
    preprocess: Preprocess | None = None,
    tile: int = 64,
) -> dict[str, Any]:
    """Fig. 4: for each snapshot ``(label, model)`` (e.g. ``("epoch 5", model)``) and each of
    ``channels`` at ``layer``, the strongest activation across ``inputs`` (``[N, 3, H, W]``,
    preprocessed) projected to pixels; renders ``out_png`` (rows = channels, columns = snapshots;
    each cell: projection, contrast-stretched on its own, beside the image patch) and returns a
    JSON-able dict: ``layer``, ``labels``, ``channels``, ``cells[c][s]`` = ``{snapshot, image, y,
    x, activation, method}`` and ``png``. ``preprocess`` un-normalises the patches (default: the
    first snapshot's)."""
    cells, projs, fields = evolve(snapshots, inputs, layer, channels)
    pre = preprocess or Preprocess.for_model(snapshots[0][1])
    hw = tuple(inputs.shape[-2:])
    images01 = pre.denormalize(inputs.detach().float().cpu()).numpy()
    rows = []
    for c, row in enumerate(cells):
        tiles = []
        for s, cell in enumerate(row):
            box, _ = seed_box(fields[s], cell["y"], cell["x"], hw)
            p = projection_tile(projs[c, s].numpy(), box, tile)
            q = patch_tile(images01[cell["image"]], box, tile)
            tiles.append(np.concatenate([p, np.ones((tile, 2, 3)), q], axis=1))
        rows.append(tiles)
    out_png = Path(out_png)
    save_png(evolution_grid(rows), out_png)
    return {
        "layer": layer,
        "labels": [label for label, _ in snapshots],
        "channels": [int(c) for c in channels],
        "cells": cells,
        "png": str(out_png),
    }
