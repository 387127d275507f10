"""Layer addresses: aliases, qualified module names, repeated calls, functional ops.

An address is ``NAME`` or ``NAME:K``. ``NAME`` is an alias from ``model.convlens_aliases``
(``conv5`` → ``features.relu5`` for zfnet), a qualified module name (``features.3``,
``layer1.0.conv1``) or a functional op from the trace (``layer1.0/add``; ``/max_pool2d`` for one
in the root ``forward``). ``K`` selects the K-th call (0-based) of a module that runs several times.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from convlens._registry import close_matches
from convlens.errors import LayerNotFoundError

__all__ = [
    "LayerRef",
    "resolve_layer",
    "resolve_layers",
    "layer_names",
    "trace_model",
    "top_conv_layer",
]

# Layers that only move or drop values: never "the top conv layer" (module or functional names).
_SKIP_TYPES = ("dropout", "identity", "flatten", "pool")


@dataclass(frozen=True)
class LayerRef:
    """A resolved layer address: canonical ``name`` (module or ``parent/op``) and optional call."""

    requested: str
    name: str
    call: int | None = None

    @property
    def key(self) -> str:
        """The recording key: ``name`` for call 0 / all calls, ``name:k`` for call k ≥ 1."""
        return self.name if not self.call else f"{self.name}:{self.call}"

    @property
    def is_function(self) -> bool:
        return "/" in self.name


def layer_names(model: nn.Module) -> list[str]:
    """Every addressable module name and alias of ``model`` (functional ops are known only
    after a forward pass: see :func:`trace_model`)."""
    aliases = list((getattr(model, "convlens_aliases", {}) or {}).keys())
    return aliases + [n for n, _ in model.named_modules() if n]


def resolve_layer(model: nn.Module, address: str) -> LayerRef:
    """Resolve one address; unknown module names raise with the close matches."""
    if not isinstance(address, str) or not address.strip():
        raise LayerNotFoundError(f"layer name must be a non-empty string, got {address!r}")
    address = address.strip()
    base, sep, call_s = address.partition(":")
    call: int | None = None
    if sep:
        if not call_s.isdigit():
            raise LayerNotFoundError(
                f"layer {address!r}: the call index after ':' must be a whole number"
            )
        call = int(call_s)
    aliases = getattr(model, "convlens_aliases", {}) or {}
    name = aliases.get(base, base)
    if "/" in name:  # functional op: validated after the forward pass
        return LayerRef(address, name, call)
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        hint = close_matches(base, layer_names(model))
        raise LayerNotFoundError(f"layer {base!r} not found in {type(model).__name__}{hint}")
    return LayerRef(address, name, call)


def resolve_layers(model: nn.Module, addresses: list[str]) -> list[LayerRef]:
    return [resolve_layer(model, a) for a in addresses]


def _example_input(model: nn.Module, batch: int = 1) -> torch.Tensor:
    info = getattr(model, "convlens_info", None)
    size = tuple(getattr(info, "input_size", None) or (3, 224, 224))
    try:
        p = next(model.parameters())
        device, dtype = p.device, p.dtype
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32
    return torch.zeros((batch, *size), device=device, dtype=dtype)


def trace_model(model: nn.Module, x: torch.Tensor | None = None):
    """Run one forward pass (on ``x``, or zeros of the model's input size) and return the
    :class:`~convlens.engine.recorder.Recording` with the full trace and receptive fields."""
    from convlens.engine.recorder import record

    if x is None:
        x = _example_input(model)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), record(model, switches=True, trace=True) as rec:
            model(x)
    finally:
        model.train(was_training)
    return rec


def top_conv_layer(model: nn.Module, rec=None) -> str:
    """The model's top convolutional layer: its ``conv{k}`` alias with the largest k where it has
    one, else the last leaf layer whose output is still a spatial map (H, W > 1), skipping
    pooling, dropout and identity layers. This is the layer Fig. 7 of the paper reads."""
    aliases = getattr(model, "convlens_aliases", {}) or {}
    convs = sorted(
        (int(a[4:]), a) for a in aliases if a.startswith("conv") and a[4:].isdigit()
    )
    if convs:
        return convs[-1][1]
    rec = rec or trace_model(model)
    for call in reversed(rec.leaves()):
        shape = call.output_shape
        if not shape or len(shape) != 4 or shape[-1] <= 1 or shape[-2] <= 1:
            continue
        if any(s in call.type.lower() for s in _SKIP_TYPES):
            continue
        return call.name
    raise LayerNotFoundError(f"{type(model).__name__} has no layer with a spatial output")
