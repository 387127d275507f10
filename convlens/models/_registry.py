"""The model registry and the one entry point, :func:`create_model`.

A registered factory builds an ``nn.Module`` from keyword options (``num_classes`` plus its
family's config fields); it never loads weights. :func:`create_model` resolves the name (the
convlens registry first, then any timm architecture), builds the model, loads weights (offline
pretrained ones, or ``weights=PATH``), puts it in eval mode and attaches ``convlens_info``
(:class:`ModelInfo`) and ``convlens_aliases``. Random weights always give a
:class:`RandomWeightsWarning`; an unknown name raises :class:`ModelNotFoundError` with the close
matches from both the registry and timm.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, overload

from torch import nn

from convlens._registry import Registry, close_matches
from convlens.errors import ModelNotFoundError, WeightsError
from convlens.models._common import (
    ModelConfigError,
    ModelInfo,
    PreprocessCfg,
    imagenet_class_names,
    warn_random_weights,
)

if TYPE_CHECKING:
    from convlens.models.pretrained import OfflineWeights

__all__ = [
    "MODELS",
    "ModelEntry",
    "register_model",
    "create_model",
    "list_models",
    "is_model",
]

ModelFactory = Callable[..., nn.Module]
F = TypeVar("F", bound=ModelFactory)


@dataclass(frozen=True)
class ModelEntry:
    """One registered model: its factory plus what :func:`create_model` needs to know about it.

    ``preprocess`` is used for random weights and ``weights=PATH``; offline ``pretrained``
    weights bring their own."""

    name: str
    factory: ModelFactory
    family: str = "custom"
    preprocess: PreprocessCfg = field(default_factory=PreprocessCfg)
    pretrained: OfflineWeights | None = None


#: Every model convlens can build by name without timm's help (zfnet, alexnet, ...).
MODELS: Registry[ModelEntry] = Registry("model", ModelNotFoundError)


@overload
def register_model(fn: F, /) -> F: ...


@overload
def register_model(
    fn: None = None,
    /,
    *,
    name: str | None = None,
    family: str = "custom",
    preprocess: PreprocessCfg | None = None,
    pretrained: OfflineWeights | None = None,
    source: str = "",
) -> Callable[[F], F]: ...


def register_model(
    fn: F | None = None,
    /,
    *,
    name: str | None = None,
    family: str = "custom",
    preprocess: PreprocessCfg | None = None,
    pretrained: OfflineWeights | None = None,
    source: str = "",
) -> F | Callable[[F], F]:
    """Register a model factory under ``name`` (default: the function's name).

    Use bare (``@register_model``) or with options (``@register_model(family="zfnet")``). The
    factory takes keyword options (at least ``num_classes``) and returns an ``nn.Module`` with
    random weights; it may set ``convlens_aliases`` on it. Registering an existing name warns
    and replaces it (see :class:`convlens._registry.Registry`). The function is returned
    unchanged."""

    def wrap(factory: F) -> F:
        entry = ModelEntry(
            name=name or factory.__name__,
            factory=factory,
            family=family,
            preprocess=preprocess or PreprocessCfg(),
            pretrained=pretrained,
        )
        MODELS.register(entry.name, entry, source or getattr(factory, "__module__", ""))
        return factory

    if fn is not None:
        return wrap(fn)
    return wrap


def is_model(name: str) -> bool:
    """Whether :func:`create_model` can build ``name`` (registered, or a timm architecture)."""
    from convlens.models.timm_adapter import is_timm_model

    return name in MODELS or is_timm_model(name)


def list_models(include_timm: bool = False, pattern: str | None = None) -> list[str]:
    """Registered model names in registration order, then (with ``include_timm``) every timm
    architecture not shadowed by a registered name, sorted. ``pattern`` is a shell-style
    wildcard (``"zfnet*"``, ``"*lite*"``)."""
    names = MODELS.names()
    if include_timm:
        from convlens.models.timm_adapter import timm_model_names

        registered = set(names)
        names = names + [n for n in timm_model_names() if n not in registered]
    if pattern:
        names = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    return names


def _resolve(name: str) -> ModelEntry:
    if not isinstance(name, str) or not name.strip():
        raise ModelNotFoundError(f"model name must be a non-empty string, got {name!r}")
    if name in MODELS:
        return MODELS.get(name)
    # "zfnet-wide" is how the paper-style name reads; the registry spells it zfnet_wide.
    if "-" in name and name.replace("-", "_") in MODELS:
        return MODELS.get(name.replace("-", "_"))
    from convlens.models.timm_adapter import (
        create_timm_model,
        is_timm_model,
        timm_model_names,
        timm_preprocess,
    )

    if is_timm_model(name):
        return ModelEntry(
            name=name,
            factory=lambda **kw: create_timm_model(name, **kw),
            family="timm",
            preprocess=timm_preprocess(name),
        )
    hint = close_matches(name, MODELS.names() + list(timm_model_names()))
    raise ModelNotFoundError(f"unknown model {name!r}: neither convlens nor timm has it{hint}")


def _timm_pretrained(name: str, num_classes: int | None, kwargs: dict) -> nn.Module:
    """A timm model with its pretrained weights from the Hugging Face cache (``--pretrained``, a
    pretrained tag, ``hf-hub:``/``timm/`` names), with that config's preprocessing."""
    import hashlib

    from timm.data import resolve_data_config

    from convlens.models.timm_adapter import create_timm_pretrained

    model, repo, path = create_timm_pretrained(name, num_classes=num_classes, **kwargs)
    model.eval()
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    cfg = resolve_data_config({}, model=model)
    n_classes = getattr(model, "num_classes", None)
    interpolation = cfg.get("interpolation", "bilinear")
    model.convlens_info = ModelInfo(
        name=name,
        family="timm",
        weights=f"pretrained:hf-hub:{repo}@sha256:{digest.hexdigest()[:16]}",
        random_init=False,
        num_classes=n_classes if isinstance(n_classes, int) else num_classes,
        input_size=tuple(cfg["input_size"]),
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        interpolation=interpolation if interpolation == "bicubic" else "bilinear",
        crop_pct=float(cfg.get("crop_pct") or 0.875),
        class_names=imagenet_class_names() if n_classes == 1000 else None,
    )
    return model


def _config_kwargs(stored: dict) -> dict:
    """A stored config as factory kwargs (JSON lists back to the tuples typed configs hold)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()}


def create_model(
    name: str,
    *,
    weights: str | os.PathLike[str] | None = None,
    pretrained: bool | None = None,
    num_classes: int | None = None,
    weights_key: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build model ``name`` in eval mode, with ``convlens_info`` and ``convlens_aliases``.

    - ``weights=PATH`` loads a ``.safetensors`` or torch checkpoint (see
      :func:`~convlens.models.load_weights`).
    - ``pretrained=None`` (default) loads the model's offline pretrained weights when it has
      some (``efficientnet_lite0``), else gives random weights; ``pretrained=True`` insists
      (:class:`WeightsError` if there are none: convlens never downloads); ``pretrained=False``
      gives random weights.
    - timm models: ``pretrained=True``, a pretrained tag (``resnet50.a1_in1k``) or an
      ``hf-hub:org/name`` / ``timm/name`` name load timm's pretrained weights the way timm does,
      from the Hugging Face cache only (the hub is put in offline mode); nothing cached is a
      one-line :class:`WeightsError` naming the cache folder and how to fetch the weights.
    - ``torchvision:NAME[:WEIGHTS]``: a torchvision classification model with its pretrained
      weights from the torch hub cache, its preprocessing and class names
      (:mod:`convlens.models.torchvision_adapter`).
    - ``weights_key`` picks the state dict under that key of the checkpoint (``state_dict_ema``).
    - A checkpoint that carries ``model_config = {"arch": NAME, **factory kwargs}`` (the
      zeiler-fergus recipe's ``model.pt`` and checkpoints) rebuilds that configuration when
      ``NAME`` is this model: explicit ``kwargs`` and ``num_classes`` still win.
    - ``num_classes`` sets the classifier size (``None``: the model's default, 1000).
    - other ``kwargs`` go to the factory (``ZFNetConfig`` fields for zfnet/alexnet, timm's
      keyword arguments for timm models); unknown ones raise :class:`ModelConfigError`.

    Random weights always issue a :class:`RandomWeightsWarning` naming the model.
    """
    if isinstance(name, str) and name.startswith("torchvision:"):
        if weights is not None or pretrained is False:
            raise WeightsError(f"model {name!r}: a torchvision: name brings its own weights")
        from convlens.models.torchvision_adapter import create_torchvision_model

        return create_torchvision_model(name, num_classes=num_classes, **kwargs)
    if isinstance(name, str) and name.startswith("timm/"):  # timm's own hub names
        name = "hf-hub:" + name
    hub = isinstance(name, str) and name.startswith("hf-hub:")
    if hub and weights is not None:
        raise WeightsError(f"model {name!r}: an hf-hub name brings its own weights; not weights=")
    entry = None if hub else _resolve(name)
    # timm's own names (not convlens's registered models, which bring their offline weights)
    plain_timm = entry is not None and entry.family == "timm" and entry.name not in MODELS
    tagged = plain_timm and "." in name
    if (
        weights is None
        and pretrained is not False
        and (hub or (plain_timm and (pretrained or tagged)))
    ):
        return _timm_pretrained(name, num_classes, kwargs)
    if weights is not None and pretrained:
        raise WeightsError(
            f"model {entry.name!r}: pass either weights=PATH or pretrained=True, not both"
        )
    if num_classes is not None and (isinstance(num_classes, bool) or num_classes < 1):
        raise ModelConfigError(f"num_classes must be a positive int, got {num_classes!r}")

    offline = entry.pretrained
    use_offline = False
    random_reason = ""
    if weights is None:
        if pretrained is False:
            random_reason = "pretrained=False was asked for"
        elif offline is None:
            if pretrained:
                raise WeightsError(
                    f"model {entry.name!r} has no offline pretrained weights and convlens never "
                    f"downloads any; pass weights=PATH (a .safetensors or torch checkpoint)"
                )
            random_reason = "convlens has no offline pretrained weights for it"
        else:
            missing = offline.unavailable_reason()
            if missing and pretrained:
                raise WeightsError(f"model {entry.name!r}: {missing}; or pass weights=PATH")
            if missing:
                random_reason = missing
            else:
                use_offline = True
        if use_offline and num_classes is not None and num_classes != offline.num_classes:
            raise WeightsError(
                f"model {entry.name!r}: its offline weights have {offline.num_classes} classes, "
                f"not {num_classes}; pass pretrained=False for a random {num_classes}-class "
                f"model, or build the {offline.num_classes}-class one and replace its classifier "
                f"(timm models: model.reset_classifier({num_classes}))"
            )

    factory_kwargs = dict(kwargs)
    source = None
    if weights is not None:  # read once: its model_config, then its tensors
        from convlens.models.checkpoint import model_config_of, read_weights_file

        source = read_weights_file(weights)
        stored = model_config_of(source)
        if stored is not None and stored.get("arch") in (entry.name, entry.family):
            stored.pop("arch")
            factory_kwargs = {**_config_kwargs(stored), **factory_kwargs}
    if num_classes is not None:
        factory_kwargs["num_classes"] = num_classes
    model = entry.factory(**factory_kwargs)

    preprocess = entry.preprocess
    if use_offline:
        assert offline is not None
        offline.load_into(model)
        weights_tag = offline.tag
        preprocess = offline.preprocess
    elif weights is not None:
        from convlens.models.checkpoint import load_weights

        load_weights(model, weights, key=weights_key, source=source)
        weights_tag = os.fspath(weights) + (f"[{weights_key}]" if weights_key else "")
    else:
        weights_tag = "random"
    model.eval()

    input_size = getattr(model, "convlens_input_size", None) or preprocess.input_size
    n_classes = getattr(model, "num_classes", None)
    if not isinstance(n_classes, int):
        n_classes = num_classes
    random_init = weights is None and not use_offline
    model.convlens_info = ModelInfo(
        name=entry.name,
        family=entry.family,
        weights=weights_tag,
        random_init=random_init,
        num_classes=n_classes,
        input_size=tuple(input_size),
        mean=tuple(preprocess.mean),
        std=tuple(preprocess.std),
        interpolation=preprocess.interpolation,
        crop_pct=preprocess.crop_pct,
        class_names=imagenet_class_names() if n_classes == 1000 and not random_init else None,
    )
    if not isinstance(getattr(model, "convlens_aliases", None), dict):
        model.convlens_aliases = {}
    if random_init:
        warn_random_weights(entry.name, random_reason)
    return model
