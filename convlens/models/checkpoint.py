"""Loading weights files safely: ``.safetensors`` or torch checkpoints, never bare pickle.

A torch checkpoint is read with ``torch.load(..., weights_only=True)``, which refuses pickled
code and arbitrary objects. The state dict may be wrapped (``{"model": ...}``,
``{"state_dict": ...}``, ``{"model_state": ...}``, as training scripts save it alongside the
optimizer and config) and its keys may carry ``module.`` (DistributedDataParallel) or
``_orig_mod.`` (``torch.compile``) prefixes; both are undone. Anything that goes wrong is a
one-line :class:`WeightsError` naming the file and the first offending keys.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from convlens.errors import WeightsError

__all__ = ["load_weights", "read_state_dict", "WRAPPER_KEYS", "STRIPPED_PREFIXES"]

#: Keys under which a checkpoint may hold the state dict, tried in this order.
WRAPPER_KEYS = ("model", "state_dict", "model_state")
#: Key prefixes that wrappers add: DistributedDataParallel, torch.compile.
STRIPPED_PREFIXES = ("module.", "_orig_mod.")
_SHOWN = 3  # offending keys named in a message


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _some(keys: list[str]) -> str:
    more = f", … ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The state dict stored in ``path`` (on CPU), unwrapped and with prefixes stripped."""
    p = Path(path)
    if not p.is_file():
        what = "is a directory, not" if p.is_dir() else "does not exist: no"
        raise WeightsError(f"weights file {os.fspath(path)!r} {what} such file")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: object = load_file(os.fspath(p), device="cpu")
        except Exception as e:  # safetensors raises several types
            raise WeightsError(
                f"weights file {os.fspath(path)!r} is not a readable .safetensors file "
                f"({_first_line(e)})"
            ) from None
    else:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError, RuntimeError, EOFError, ...
            raise WeightsError(
                f"weights file {os.fspath(path)!r} cannot be loaded safely: it is not a torch "
                f"checkpoint of plain tensors (torch.load weights_only=True: {_first_line(e)})"
            ) from None
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


def load_weights(
    model: nn.Module, path: str | os.PathLike[str], strict: bool = True
) -> tuple[list[str], list[str]]:
    """Load the weights in ``path`` into ``model`` in place.

    ``.safetensors`` files go through ``safetensors.torch.load_file``; anything else through
    ``torch.load(path, map_location="cpu", weights_only=True)``. With ``strict`` (default)
    missing or unexpected keys are a :class:`WeightsError`; a shape mismatch always is. Returns
    ``(missing_keys, unexpected_keys)`` (both empty when ``strict``)."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    name = type(model).__name__
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_some(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_some(unexpected)}")
        raise WeightsError(
            f"weights file {os.fspath(path)!r} does not fit {name}: {'; '.join(parts)}"
        )
    mismatched = [
        f"{k} {tuple(v.shape)} in file vs {tuple(own[k].shape)} in model"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if mismatched:
        raise WeightsError(
            f"weights file {os.fspath(path)!r} does not fit {name}: {len(mismatched)} shape "
            f"mismatch(es): {_some(mismatched)}"
        )
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return list(missing), list(unexpected)
