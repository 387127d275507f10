"""Loading weights files safely: ``.safetensors`` or torch checkpoints, never bare pickle.

A torch checkpoint is read with ``torch.load(..., weights_only=True)``, which refuses pickled
code and arbitrary objects; the few harmless globals real training checkpoints hold are allowed
through PyTorch's safe-globals mechanism (:data:`SAFE_GLOBALS`: ``argparse.Namespace`` — timm's
``args`` —, NumPy scalars and dtypes), never full unpickling. A checkpoint that still needs another
global is refused with its name and how to convert the file to safetensors. The state dict may be
wrapped (``{"model": ...}``, ``{"state_dict": ...}``, ``{"model_state": ...}``, as training scripts
save it alongside the optimizer and config; EMA weights — ``state_dict_ema``, ``model_ema`` — when
asked for with ``key``) and its keys may carry ``module.`` (DistributedDataParallel) or
``_orig_mod.`` (``torch.compile``) prefixes; both are undone. A corrupt or truncated file says
so. Anything that goes wrong is a one-line :class:`WeightsError` naming the file and the first
offending keys (missing, unexpected, wrong shape; a classifier that alone differs suggests
``--num-classes``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from convlens.errors import WeightsError

__all__ = [
    "load_weights",
    "read_state_dict",
    "read_checkpoint",
    "checkpoint_model_config",
    "model_config_of",
    "read_weights_file",
    "WRAPPER_KEYS",
    "EMA_KEYS",
    "STRIPPED_PREFIXES",
    "SAFE_GLOBALS",
]

#: Keys under which a checkpoint may hold the state dict, tried in this order.
WRAPPER_KEYS = ("model", "state_dict", "model_state")
#: Keys of exponential-moving-average weights (timm's ``state_dict_ema``): chosen with ``key``.
EMA_KEYS = ("state_dict_ema", "model_ema", "ema")
#: Key prefixes that wrappers add: DistributedDataParallel, torch.compile.
STRIPPED_PREFIXES = ("module.", "_orig_mod.")
_SHOWN = 3  # offending keys named in a message


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _first_line(e: BaseException) -> str:
    text = _ANSI.sub("", str(e)).strip().splitlines()
    return f"{type(e).__name__}: {text[0].strip()}" if text else type(e).__name__


def _safe_globals() -> list:
    """The harmless globals a training checkpoint may hold besides tensors."""
    import argparse
    import importlib

    import numpy as np

    out: list = [argparse.Namespace, np.dtype]
    for name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            out.append(importlib.import_module(name).scalar)
            break
        except (ImportError, AttributeError):
            continue
    for t in ("float64", "float32", "float16", "int64", "int32", "bool"):
        out.append(type(np.dtype(t)))
    return out


#: Allowed besides tensors, dicts, lists, numbers and strings (see the module docstring).
SAFE_GLOBALS = ("argparse.Namespace", "numpy scalars", "numpy dtypes")


def read_checkpoint(path: str | os.PathLike[str]) -> object:
    """``torch.load(path, weights_only=True)`` with :data:`SAFE_GLOBALS` allowed; every failure is
    a one-line :class:`WeightsError` saying what is wrong with the file."""
    p = Path(path)
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError, ...
        text = _ANSI.sub("", str(e))
        needed = re.search(r"(?:Unsupported global: GLOBAL|GLOBAL)\s+([\w.]+)", text)
        if needed:
            name = needed.group(1)
            raise WeightsError(
                f"weights file {os.fspath(path)!r} needs the Python global {name}, which "
                "loading with weights_only=True does not allow (convlens never unpickles "
                "arbitrary objects); convert it once, on a machine where you trust the file: "
                "torch.load(path, weights_only=False), then safetensors.torch.save_file(<its "
                "state dict>, 'weights.safetensors')"
            ) from None
        if isinstance(e, EOFError) or any(
            s in text
            for s in ("central directory", "PytorchStreamReader", "unexpected EOF", "truncated",
                      "invalid load key", "could not find MARK", "pickle data was truncated")
        ):  # fmt: skip
            raise WeightsError(
                f"weights file {os.fspath(path)!r} is corrupt or truncated: not a readable torch "
                f"checkpoint ({_first_line(e)})"
            ) from None
        raise WeightsError(
            f"weights file {os.fspath(path)!r} cannot be loaded safely: it is not a torch "
            f"checkpoint of plain tensors (torch.load weights_only=True: {_first_line(e)})"
        ) from None


def _some(keys: list[str]) -> str:
    more = f", … ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def model_config_of(obj: object) -> dict | None:
    """The ``model_config`` a loaded checkpoint carries (``{"arch": name, **factory kwargs}``, as
    the zeiler-fergus recipe writes it), or None (plain state dicts, safetensors)."""
    cfg = obj.get("model_config") if isinstance(obj, Mapping) else None
    if isinstance(cfg, Mapping) and isinstance(cfg.get("arch"), str):
        return dict(cfg)
    return None


def checkpoint_model_config(path: str | os.PathLike[str]) -> dict | None:
    """:func:`model_config_of` the checkpoint at ``path`` (None for safetensors files)."""
    p = Path(path)
    if p.suffix == ".safetensors" or not p.is_file():
        return None
    return model_config_of(read_checkpoint(p))


def read_weights_file(path: str | os.PathLike[str]) -> object:
    """What ``path`` holds: a safetensors dict or a torch checkpoint (``weights_only``), read once;
    :func:`read_state_dict` and :func:`load_weights` take it as ``source``."""
    p = Path(path)
    if not p.is_file():
        what = "is a directory, not" if p.is_dir() else "does not exist: no"
        raise WeightsError(f"weights file {os.fspath(path)!r} {what} such file")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(os.fspath(p), device="cpu")
        except Exception as e:  # safetensors raises several types
            raise WeightsError(
                f"weights file {os.fspath(path)!r} is not a readable .safetensors file "
                f"({_first_line(e)})"
            ) from None
    return read_checkpoint(p)


def read_state_dict(
    path: str | os.PathLike[str], key: str | None = None, source: object | None = None
) -> dict[str, torch.Tensor]:
    """The state dict stored in ``path`` (on CPU), unwrapped and with prefixes stripped.
    ``key``: take the state dict under that key of the checkpoint (e.g. ``state_dict_ema``).
    ``source``: the file's content when already read (:func:`read_weights_file`)."""
    obj = read_weights_file(path) if source is None else source
    if key is not None:
        if not isinstance(obj, Mapping) or not isinstance(obj.get(key), Mapping):
            have = ", ".join(str(k) for k in obj) if isinstance(obj, Mapping) else "no keys"
            raise WeightsError(
                f"weights file {os.fspath(path)!r} has no state dict under {key!r} "
                f"(its keys: {have})"
            )
        obj = obj[key]
    return _unwrap(obj, path)


def _unwrap(obj: object, path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    for _ in range(3):  # {"state_dict": {"model": {...}}} happens; deeper does not
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(
            f"weights file {os.fspath(path)!r} holds no state dict "
            f"(got {type(obj).__name__}{' (empty)' if isinstance(obj, Mapping) else ''})"
        )
    bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(
            f"weights file {os.fspath(path)!r} holds non-tensor entries: {_some(bad)} "
            f"(expected a state dict, optionally under one of {', '.join(WRAPPER_KEYS)})"
        )
    state = {str(k): v for k, v in obj.items()}
    stripped = True
    while stripped:
        stripped = False
        for prefix in STRIPPED_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                stripped = True
    return state


def _classifier_prefix(model: nn.Module) -> str | None:
    """The classifier's module name: timm's ``pretrained_cfg["classifier"]``, else the last
    ``nn.Linear`` (or a final 1x1 ``nn.Conv2d``)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    name = cfg.get("classifier") if isinstance(cfg, Mapping) else None
    if isinstance(name, str) and name:
        return name
    last = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last = n
    return last


def load_weights(
    model: nn.Module,
    path: str | os.PathLike[str],
    strict: bool = True,
    key: str | None = None,
    source: object | None = None,
) -> tuple[list[str], list[str]]:
    """Load the weights in ``path`` into ``model`` in place.

    ``.safetensors`` files go through ``safetensors.torch.load_file``; anything else through
    ``torch.load(path, map_location="cpu", weights_only=True)`` (with :data:`SAFE_GLOBALS`).
    ``key`` picks the state dict under that checkpoint key (``state_dict_ema``). With ``strict``
    (default) missing or unexpected keys are a :class:`WeightsError`; a shape mismatch always is.
    The message lists a few of each kind, then counts; when only the classifier differs it
    suggests ``--num-classes``. Returns ``(missing_keys, unexpected_keys)`` (both empty when
    ``strict``)."""
    state = read_state_dict(path, key, source)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    name = type(model).__name__
    shapes = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    if (strict and (missing or unexpected)) or shapes:
        parts = []
        if missing and strict:
            parts.append(f"{len(missing)} missing key(s): {_some(missing)}")
        if unexpected and strict:
            parts.append(f"{len(unexpected)} unexpected key(s): {_some(unexpected)}")
        if shapes:
            shown = [f"{k} {tuple(state[k].shape)} in file vs {tuple(own[k].shape)} in model"
                     for k in shapes]  # fmt: skip
            parts.append(f"{len(shapes)} shape mismatch(es): {_some(shown)}")
        head = _classifier_prefix(model)
        hint = ""
        only_head = head is not None and all(
            k == head or k.startswith(head + ".") for k in (*shapes, *missing, *unexpected)
        )
        if only_head and shapes:
            w = state.get(f"{head}.weight")
            if w is not None and w.dim() >= 1:
                hint = (f"; only the classifier ({head}) differs: the file has {w.shape[0]} "
                        f"classes, pass --num-classes {w.shape[0]} (num_classes={w.shape[0]})")  # fmt: skip
        raise WeightsError(
            f"weights file {os.fspath(path)!r} does not fit {name}: {'; '.join(parts)}{hint}"
        )
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return list(missing), list(unexpected)
