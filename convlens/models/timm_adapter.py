"""Any timm architecture by name, always built with ``pretrained=False``.

convlens never downloads: a timm model gets random weights unless convlens has offline weights
for it (:mod:`convlens.models.pretrained`) or the caller passes ``weights=PATH``. timm is
imported on first use only (it takes seconds to import).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """The Hugging Face hub in offline mode for the block: files come from its cache or not at
    all (convlens never downloads)."""
    from huggingface_hub import constants

    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


def hub_repo(name: str) -> str | None:
    """The Hugging Face repository timm loads ``name``'s pretrained weights from."""
    if name.startswith("hf-hub:"):
        return name[len("hf-hub:") :].split("@")[0]
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    return getattr(cfg, "hf_hub_id", None) if cfg is not None else None


def cached_weights_file(repo: str) -> str | None:
    """The weights file of ``repo`` in the Hugging Face cache, or None (nothing is fetched)."""
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        path = try_to_load_from_cache(repo, filename)
        if isinstance(path, str):
            return path
    return None


def create_timm_pretrained(name: str, *, num_classes: int | None = None, **kwargs: Any):
    """``timm.create_model(name, pretrained=True)`` — tags (``resnet50.a1_in1k``) and
    ``hf-hub:org/name`` included — loading from the Hugging Face cache only. Returns
    ``(model, repo, weights file)``; nothing cached is a one-line :class:`WeightsError` naming
    the model, the cache folder searched and how to fetch it on a connected machine."""
    import timm
    from huggingface_hub import constants

    from convlens.errors import WeightsError

    if not name.startswith("hf-hub:") and not is_timm_model(name):
        from convlens.models._registry import MODELS

        hint = close_matches(name, MODELS.names() + list(timm_model_names()))
        raise ModelNotFoundError(f"unknown model {name!r}: neither convlens nor timm has it{hint}")
    repo = hub_repo(name)
    if repo is None:
        raise WeightsError(f"model {name!r}: timm knows no pretrained weights for it")
    path = cached_weights_file(repo)
    if path is None:
        raise WeightsError(
            f"model {name!r}: its pretrained weights ({repo}) are not in the Hugging Face cache "
            f"{constants.HF_HUB_CACHE} and convlens never downloads; on a connected machine run "
            f"python -c \"import timm; timm.create_model('{name}', pretrained=True)\" and copy "
            "that cache folder here (or point HF_HOME at a copy), or pass --weights PATH "
            "(weights=PATH)"
        )
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        with hub_offline():
            model = timm.create_model(name, pretrained=True, **kwargs)
    except TypeError as e:
        raise ModelConfigError(f"model {name!r}: {e}") from e
    except Exception as e:  # noqa: BLE001 - hub and timm raise many kinds
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(
            f"model {name!r}: its cached pretrained weights ({repo}) could not be loaded "
            f"({type(e).__name__}: {first})"
        ) from None
    disable_inplace(model)
    model.convlens_aliases = {}
    return model, repo, path
