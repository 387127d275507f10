"""Feature invariance (Zeiler & Fergus 2014, Section 4, Fig. 5), as a function.

    from convlens_invariance import invariance
    res = invariance(model, images, layers=["conv1", "fc7"], transforms=["translate"])
    res.curves["translate"][0]["distance"]["conv1"]      # one value per amount

For each image and transform amount: the Euclidean distance between the feature vectors of the
transformed and the untransformed image at each layer (Fig. 5, columns 2 and 3), and the
probability of the true label (column 4; the given label, or the untransformed image's top-1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from convlens_correspondence.features import DEFAULT_BATCH, extract, paper_layers
from PIL import Image
from torch import nn

from convlens.data import Preprocess
from convlens.errors import ConvlensError
from convlens_invariance.transforms import (
    IDENTITY,
    TRANSFORMS,
    amounts_for,
    resized_tensor,
    warp,
)

__all__ = ["invariance", "InvarianceResult", "translation_growth"]


@dataclass
class InvarianceResult:
    """Curves per transform and image: ``curves[kind][i] = {"distance": {layer: [...]},
    "prob": [...]}`` over ``amounts[kind]``."""

    layers: list[str]
    names: list[str]
    amounts: dict[str, list[float]]
    labels: list[int]
    label_source: str
    base_probs: list[float]
    curves: dict[str, list[dict[str, Any]]]
    canvas: str
    preprocess: Preprocess
    examples: dict[str, torch.Tensor] = field(default_factory=dict)

    def normalised(self, kind: str, layer: str) -> np.ndarray:
        """``[N, A]`` distances of each image divided by its distance at the largest |amount|
        (the mean of both ends when two amounts share it) — the curve's shape, not its scale."""
        amounts = np.asarray(self.amounts[kind])
        d = np.asarray([c["distance"][layer] for c in self.curves[kind]], dtype=np.float64)
        far = np.abs(amounts - IDENTITY[kind])
        ends = d[:, np.isclose(far, far.max())].mean(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(ends > 0, d / ends, np.nan)


def translation_growth(res: InvarianceResult) -> dict[str, float] | None:
    """Per layer, the mean (over images) normalised distance at the smallest non-zero shift:
    near 1 means the distance jumps at once (Fig. 5: layer 1), small means it grows slowly and
    about linearly (layer 7). ``None`` when translation was not run or has one shift size."""
    if "translate" not in res.curves:
        return None
    amounts = np.asarray(res.amounts["translate"])
    nz = np.abs(amounts) > 0
    if not nz.any():
        return None
    nearest = nz & np.isclose(np.abs(amounts), np.abs(amounts[nz]).min())
    if np.isclose(np.abs(amounts[nz]).min(), np.abs(amounts).max()):
        return None  # one shift size only: nothing to compare it with
    return {
        layer: float(np.nanmean(res.normalised("translate", layer)[:, nearest]))
        for layer in res.layers
    }


def invariance(
    model: nn.Module,
    images: Sequence[Image.Image],
    layers: Sequence[str] | None = None,
    *,
    names: Sequence[str] | None = None,
    transforms: Sequence[str] = TRANSFORMS,
    amounts: dict[str, Sequence[float]] | None = None,
    labels: Sequence[int] | None = None,
    canvas: str = "mean",
    preprocess: Preprocess | None = None,
    device: torch.device | str | None = None,
    batch_size: int = DEFAULT_BATCH,
    progress: Callable[[int], None] | None = None,
) -> InvarianceResult:
    """Fig. 5 for ``images`` (PIL). ``layers``: default the equivalents of ZFNet's layers 1 and 7
    (:func:`~convlens_correspondence.features.paper_layers`). ``amounts``: per transform (default
    :func:`~convlens_invariance.transforms.amounts_for`). ``labels``: the true class of each image
    (default: the untransformed image's top-1)."""
    images = list(images)
    if not images:
        raise ConvlensError("invariance: no images")
    names = list(names) if names is not None else [f"image {i}" for i in range(len(images))]
    pre = preprocess or Preprocess.for_model(model)
    if device is None:
        try:
            device = next(model.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
    kinds = list(dict.fromkeys(transforms))
    grid = {k: sorted({float(a) for a in (amounts or {}).get(k) or amounts_for(k)}) for k in kinds}
    resized = [resized_tensor(img, pre) for img in images]
    crops = [pre.crop_box(*img.size) for img in images]

    if not layers:
        first = warp(resized[0], crops[0], "translate", [0.0], canvas)
        layers = paper_layers(model, [1, 7], first.to(device))
    layers = list(dict.fromkeys(layers))

    curves: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    examples: dict[str, torch.Tensor] = {}
    got_labels: list[int] = []
    base_probs: list[float] = []
    for i in range(len(images)):
        for kind in kinds:
            # row 0 is the untransformed crop, in the same batch as the transformed ones
            xs = warp(resized[i], crops[i], kind, [IDENTITY[kind], *grid[kind]], canvas)
            feats, logits = extract(model, xs, layers, device=device, batch_size=batch_size)
            if logits.dim() != 2 or logits.shape[1] < 2:
                raise ConvlensError(
                    f"invariance: the model's output {list(logits.shape)} is not class scores"
                )
            probs = logits.double().softmax(-1)
            if len(got_labels) <= i:
                if labels is not None:
                    label = int(labels[i])
                    if not 0 <= label < probs.shape[1]:
                        raise ConvlensError(
                            f"label {label} of {names[i]}: the model has {probs.shape[1]} classes"
                        )
                else:
                    label = int(probs[0].argmax())
                got_labels.append(label)
                base_probs.append(float(probs[0, label]))
            label = got_labels[i]
            dist = {
                layer: (feats[layer][1:].double() - feats[layer][:1].double()).norm(dim=1).tolist()
                for layer in layers
            }
            curves[kind].append({"distance": dist, "prob": probs[1:, label].tolist()})
            if i == 0:
                examples[kind] = xs[1:]
            if progress is not None:
                progress(1)
    return InvarianceResult(
        layers=layers,
        names=names,
        amounts=grid,
        labels=got_labels,
        label_source="given" if labels is not None else "top-1 of the untransformed image",
        base_probs=base_probs,
        curves=curves,
        canvas=canvas,
        preprocess=pre,
        examples=examples,
    )
