"""Correspondence analysis (Zeiler & Fergus 2014, Section 4.3, Table 1, Fig. 8), as a function.

    from convlens_correspondence import correspondence, embedded_faces
    res = correspondence(model, embedded_faces(), layers=["conv5", "fc7"], random=10, seed=0)
    res.table()     # {"right_eye": {"conv5": (mean, std), ...}, ..., "random": {...}}

For every part, the same part is masked in every image with a grey box; at each layer the change
``eps_i = x_i - x~_i`` of each image's feature vector is compared across images with
:func:`~convlens_correspondence.delta.delta`. The baseline masks the same number of boxes of the
same sizes at random positions (inside each image's object box when one is given), ``random``
times.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from convlens.data import Preprocess
from convlens.errors import ConvlensError
from convlens_correspondence.delta import (
    Box,
    apply_masks,
    delta,
    jitter_box,
    map_box,
    random_box,
)
from convlens_correspondence.features import DEFAULT_BATCH, extract, paper_layers
from convlens_correspondence.parts import PartImage

__all__ = ["correspondence", "CorrespondenceResult", "Row", "RANDOM", "NORMALISATION"]

#: The name of the random-mask baseline's row.
RANDOM = "random"

NORMALISATION = (
    "Delta_l / (N (N-1) D_l): the fraction of the D_l units of layer l whose signs of "
    "eps = x - x~ differ (sign(0) = 0 is a value of its own), averaged over the N (N-1) ordered "
    "pairs of images i != j"
)


@dataclass
class Row:
    """One line of Table 1: a part (or the random baseline), the images it was measured on,
    the mask boxes of each draw (model-input pixels, ``None`` where an image has no mask) and,
    per layer, the :func:`~convlens_correspondence.delta.delta` of each draw."""

    name: str
    kind: str  # "part" | "random"
    images: list[int]
    draws: list[list[Box | None]] = field(default_factory=list)
    scores: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def std_over(self) -> str:
        return "draws" if len(self.draws) > 1 else "pairs"

    def stat(self, layer: str) -> tuple[float, float]:
        """``(mean, std)`` of the normalised Delta: over draws when there are several, else the
        single draw's value and the standard deviation over its image pairs."""
        values = [s["value"] for s in self.scores[layer]]
        if len(values) > 1:
            return float(np.mean(values)), float(np.std(values))
        return float(values[0]), float(self.scores[layer][0]["pair_std"])


@dataclass
class CorrespondenceResult:
    """Everything needed to redo every number: inputs, boxes, fill, layers, scores."""

    layers: list[str]
    items: list[PartImage]
    inputs: torch.Tensor
    input_boxes: list[dict[str, tuple[Box, bool]]]
    object_boxes: list[Box | None]
    rows: list[Row]
    fill_rgb01: float
    fill: tuple[float, float, float]
    preprocess: Preprocess
    seed: int
    random: int
    jitter: float
    units: dict[str, int]
    logits: torch.Tensor

    def table(self) -> dict[str, dict[str, tuple[float, float]]]:
        """``{row: {layer: (mean, std)}}`` — Table 1."""
        return {r.name: {layer: r.stat(layer) for layer in self.layers} for r in self.rows}

    def masked(self, row: Row, draw: int = 0) -> torch.Tensor:
        """The masked inputs of one draw of a row (what the model saw)."""
        return apply_masks(self.inputs, row.draws[draw], self.fill)


def _size(b: Box) -> tuple[int, int]:
    return b[2] - b[0], b[3] - b[1]


def correspondence(
    model: nn.Module,
    items: Sequence[PartImage],
    layers: Sequence[str] | None = None,
    *,
    preprocess: Preprocess | None = None,
    random: int = 10,
    jitter: float = 0.0,
    fill: float = 0.5,
    seed: int = 0,
    device: torch.device | str | None = None,
    batch_size: int = DEFAULT_BATCH,
    progress: Callable[[int], None] | None = None,
) -> CorrespondenceResult:
    """Table 1 for ``items`` (images with part boxes in their own pixels).

    ``layers``: default the model's equivalents of ZFNet's layers 5 and 7
    (:func:`~convlens_correspondence.features.paper_layers`). ``random``: draws of the random
    baseline (0: none). ``jitter`` > 0: each part's masks are also drawn ``random`` times,
    shifted by up to that fraction of the box size, and its ± is over those draws. ``fill``: the
    masks' grey level in [0, 1] RGB. Random positions come from ``numpy.random.default_rng(seed)``,
    jitter from ``default_rng([seed, 1])``.
    """
    items = list(items)
    if len(items) < 2:
        raise ConvlensError(f"correspondence needs at least 2 images, got {len(items)}")
    if random < 0:
        raise ConvlensError(f"--random {random}: must be 0 or more")
    if not 0.0 <= jitter <= 1.0:
        raise ConvlensError(f"--jitter {jitter}: must lie in [0, 1] (a fraction of the box size)")
    pre = preprocess or Preprocess.for_model(model)
    fill_model = pre.to_model_space(fill)
    if device is None:
        try:
            device = next(model.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
    x = torch.stack([pre(it.image) for it in items])
    n = x.shape[0]
    height, width = pre.input_size

    input_boxes: list[dict[str, tuple[Box, bool]]] = []
    object_boxes: list[Box | None] = []
    for it in items:
        mapped = {}
        for part, b in it.parts.items():
            try:
                mapped[part] = map_box(b, it.size, pre)
            except ConvlensError as exc:
                raise ConvlensError(f"{it.name} → {part}: {exc}") from None
            if mapped[part][1]:
                warnings.warn(
                    f"{it.name} → {part}: box {list(b)} is partly outside the centre crop the "
                    "model sees; masking the visible part",
                    stacklevel=2,
                )
        input_boxes.append(mapped)
        object_boxes.append(map_box(it.object_box, it.size, pre)[0] if it.object_box else None)

    part_names: list[str] = []
    for mapped in input_boxes:
        part_names += [p for p in mapped if p not in part_names]
    if RANDOM in part_names:
        raise ConvlensError(f"part name {RANDOM!r} is reserved for the random baseline")

    if layers is None or len(layers) == 0:
        layers = paper_layers(model, [5, 7], x[:1].to(device))
    layers = list(dict.fromkeys(layers))
    base, logits = extract(model, x, layers, device=device, batch_size=batch_size)
    units = {layer: int(base[layer].shape[1]) for layer in layers}

    def score(row: Row, boxes: list[Box | None]) -> None:
        # every draw masks a batch of all N images (unmasked where None): the same batch shapes
        # as the base pass, so an unaffected unit gives eps == 0 exactly
        feats, _ = extract(
            model, apply_masks(x, boxes, fill_model), layers, device=device, batch_size=batch_size
        )
        idx = torch.as_tensor(row.images)
        for layer in layers:
            eps = base[layer][idx] - feats[layer][idx]
            row.scores.setdefault(layer, []).append(delta(eps))
        row.draws.append(list(boxes))
        if progress is not None:
            progress(1)

    rows: list[Row] = []
    jitter_rng = np.random.default_rng([seed, 1])
    for part in part_names:
        idx = [i for i, m in enumerate(input_boxes) if part in m]
        if len(idx) < 2:
            warnings.warn(
                f"part {part!r} is boxed in only {len(idx)} image; it needs at least 2 "
                "and is left out",
                stacklevel=2,
            )
            continue
        row = Row(part, "part", idx)
        exact = [input_boxes[i][part][0] if part in input_boxes[i] else None for i in range(n)]
        if jitter > 0 and random > 0:
            for _ in range(random):
                score(
                    row,
                    [
                        None if b is None else jitter_box(jitter_rng, b, jitter, (width, height))
                        for b in exact
                    ],
                )
        else:
            score(row, exact)
        rows.append(row)
    if not rows:
        raise ConvlensError("no part is boxed in at least 2 images: nothing to compare")

    if random > 0:
        rng = np.random.default_rng(seed)
        row = Row(RANDOM, "random", list(range(n)))
        for r in range(random):
            want = part_names[r % len(part_names)]
            boxes: list[Box | None] = []
            for i in range(n):
                own = input_boxes[i].get(want) or next(iter(input_boxes[i].values()))
                region = object_boxes[i] or (0, 0, width, height)
                boxes.append(random_box(rng, _size(own[0]), region))
            score(row, boxes)
        rows.append(row)

    return CorrespondenceResult(
        layers=list(layers),
        items=items,
        inputs=x,
        input_boxes=input_boxes,
        object_boxes=object_boxes,
        rows=rows,
        fill_rgb01=float(fill),
        fill=tuple(float(v) for v in fill_model),  # type: ignore[arg-type]
        preprocess=pre,
        seed=int(seed),
        random=int(random),
        jitter=float(jitter),
        units=units,
        logits=logits,
    )


def draw_count(items: Sequence[PartImage], random: int, jitter: float) -> int:
    """How many masked passes :func:`correspondence` makes (for a progress bar)."""
    parts = {p for it in items for p in it.parts}
    per_part = random if (jitter > 0 and random > 0) else 1
    return len(parts) * per_part + max(random, 0)
