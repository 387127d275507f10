"""Any timm architecture by name, always built with ``pretrained=False``.

convlens never downloads: a timm model gets random weights unless convlens has offline weights
for it (:mod:`convlens.models.pretrained`) or the caller passes ``weights=PATH``. timm is
imported on first use only (it takes seconds to import).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from torch import nn

from convlens._registry import close_matches
from convlens.errors import ModelNotFoundError
from convlens.models._common import ModelConfigError, PreprocessCfg

__all__ = [
    "create_timm_model",
    "disable_inplace",
    "is_timm_model",
    "timm_model_names",
    "timm_preprocess",
]


@lru_cache(maxsize=1)
def timm_model_names() -> tuple[str, ...]:
    """Every architecture name timm can build (no pretrained tags), sorted."""
    import timm

    return tuple(timm.list_models())


def is_timm_model(name: str) -> bool:
    """Whether timm can build ``name`` (``"resnet18"``, or with a tag, ``"resnet18.a1_in1k"``)."""
    import timm

    return isinstance(name, str) and bool(name) and timm.is_model(name)


def timm_preprocess(name: str) -> PreprocessCfg:
    """The preprocessing timm records for ``name`` (its default pretrained tag), which is what a
    checkpoint trained with timm expects; ImageNet defaults where timm records nothing."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None:
        return PreprocessCfg()
    interpolation = cfg.interpolation if cfg.interpolation == "bicubic" else "bilinear"
    return PreprocessCfg(
        input_size=tuple(cfg.input_size),
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        interpolation=interpolation,
        crop_pct=float(cfg.crop_pct or 0.875),
    )


def create_timm_model(name: str, *, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=False, ...)`` with in-place activations switched off
    (:func:`disable_inplace`); an unknown name raises
    :class:`ModelNotFoundError` with close matches, an option timm rejects
    :class:`ModelConfigError`."""
    import timm

    if not is_timm_model(name):
        from convlens.models._registry import MODELS

        hint = close_matches(name, MODELS.names() + list(timm_model_names()))
        raise ModelNotFoundError(f"unknown model {name!r}: neither convlens nor timm has it{hint}")
    for forbidden in ("pretrained", "pretrained_cfg_overlay", "checkpoint_path"):
        if forbidden in kwargs:
            raise ModelConfigError(
                f"model {name!r}: {forbidden}= is not passed to timm (convlens never downloads); "
                f"use create_model(..., weights=PATH)"
            )
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:  # unexpected keyword arguments end up here
        raise ModelConfigError(f"model {name!r}: {e}") from e
    disable_inplace(model)
    model.convlens_aliases = {}
    return model


def disable_inplace(model: nn.Module) -> int:
    """Set ``inplace=False`` on every module that has the flag (timm builds ``ReLU``/``ReLU6``
    in place). In-place activations overwrite their input, which breaks Captum's hook-based
    attributions and any probe that reads a layer's input after the forward; the outputs are
    unchanged. Returns how many modules were switched."""
    switched = 0
    for module in model.modules():
        if getattr(module, "inplace", None) is True:
            module.inplace = False
            switched += 1
    return switched
