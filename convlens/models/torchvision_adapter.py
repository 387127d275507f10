"""torchvision classification models with their pretrained weights (``torchvision:alexnet``,
``torchvision:vgg16``, ... — the Z&F-era nets people compare against), through torchvision's
weights API and the torch hub cache only: convlens never downloads.

``torchvision:NAME`` uses ``NAME``'s ``DEFAULT`` weights; ``torchvision:NAME:WEIGHTS`` names an
enum member (``torchvision:resnet50:IMAGENET1K_V2``). The weights file must already be in
``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME``); it is read with ``weights_only=True``.
Preprocessing (resize, crop, mean, std, interpolation) and the class names come from the weights'
own ``transforms()`` and ``meta``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from torch import nn

from convlens._registry import close_matches
from convlens.errors import ModelNotFoundError, WeightsError
from convlens.models._common import ModelConfigError, ModelInfo

__all__ = ["PREFIX", "create_torchvision_model", "checkpoint_path"]

PREFIX = "torchvision:"


def _weights(spec: str):
    from torchvision.models import get_model_weights, list_models

    body = spec[len(PREFIX) :]
    arch, _, member = body.partition(":")
    names = list_models(module=__import__("torchvision").models)
    if arch not in names:
        raise ModelNotFoundError(
            f"unknown model {spec!r}: torchvision has no classification model {arch!r}"
            f"{close_matches(arch, names)}"
        )
    enum = get_model_weights(arch)
    if member:
        if member not in enum.__members__:
            raise ModelNotFoundError(
                f"unknown weights {member!r} for {arch}: one of {', '.join(enum.__members__)}"
            )
        return arch, enum[member]
    return arch, enum.DEFAULT


def checkpoint_path(url: str) -> Path:
    """Where torch hub keeps the file of ``url``."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def create_torchvision_model(spec: str, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """The pretrained torchvision model ``spec`` from the torch hub cache, in eval mode, with
    ``convlens_info`` (preprocessing and class names from its weights) and empty aliases."""
    import torch
    from torchvision.models import get_model

    arch, weights = _weights(spec)
    path = checkpoint_path(weights.url)
    if not path.is_file():
        raise WeightsError(
            f"model {spec!r}: its pretrained weights ({weights}) are not in the torch hub cache "
            f"{path.parent} and convlens never downloads; on a connected machine run "
            f"python -c \"import torchvision; torchvision.models.get_model('{arch}', "
            f"weights='DEFAULT')\" and copy that folder here (or point TORCH_HOME at a copy)"
        )
    if num_classes is not None and num_classes != len(weights.meta["categories"]):
        raise ModelConfigError(
            f"model {spec!r}: its weights have {len(weights.meta['categories'])} classes, not "
            f"{num_classes}; load it as is, or build {arch} by timm name with --num-classes"
        )
    try:
        model = get_model(arch, weights=None, **kwargs)
    except TypeError as e:
        raise ModelConfigError(f"model {spec!r}: {e}") from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as e:  # noqa: BLE001 - corrupt file, wrong architecture
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"model {spec!r}: {path} could not be loaded ({first})") from None
    model.eval()
    t = weights.transforms()
    crop = int(t.crop_size[0])
    resize = int(t.resize_size[0])
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    interpolation = str(t.interpolation.value).lower()
    model.convlens_info = ModelInfo(
        name=spec,
        family="torchvision",
        weights=f"pretrained:torchvision:{weights}@sha256:{digest}",
        random_init=False,
        num_classes=len(weights.meta["categories"]),
        input_size=(3, crop, crop),
        mean=tuple(float(v) for v in t.mean),
        std=tuple(float(v) for v in t.std),
        interpolation=interpolation if interpolation == "bicubic" else "bilinear",
        crop_pct=crop / resize,
        class_names=tuple(weights.meta["categories"]),
    )
    model.convlens_aliases = {}
    return model
