"""One recorded forward pass that stops after the layer of interest.

A deconvnet projection or a top-k mining pass only needs the network up to the chosen layer; the
layers above it (pool5, fc6–fc8 for zfnet conv5; the head of a timm model) are skipped by raising
from a forward hook on that layer once it has run (and been recorded). The hook is registered
inside the engine's ``record`` block, so it runs after the recorder's own hook and is removed in
``finally``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from convlens.engine import Recording, record, resolve_layer

__all__ = ["recorded_forward", "trace_to"]


class _Stop(Exception):
    """Internal: the layer of interest has run."""


@contextlib.contextmanager
def _stop_after(model: nn.Module, layer: str) -> Iterator[None]:
    ref = resolve_layer(model, layer)
    if ref.is_function:  # a functional op: no module to hook, run the whole forward
        yield
        return
    module = model.get_submodule(ref.name) if ref.name else model
    if module is model:
        yield
        return
    wanted = ref.call or 0
    seen = {"n": 0}

    def hook(mod: nn.Module, args: Any, output: Any) -> None:
        seen["n"] += 1
        if seen["n"] > wanted:
            raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def recorded_forward(
    model: nn.Module,
    x: torch.Tensor,
    layers: Sequence[str],
    stop_at: str | None,
    extra_modes: Sequence[contextlib.AbstractContextManager] = (),
    **record_kwargs: Any,
) -> Recording:
    """``record(model, layers, **record_kwargs)`` around ``model(x)``, stopped right after
    ``stop_at`` ran (every one of ``layers`` must run at or before it). ``extra_modes`` (e.g. the
    deconvnet's function mode) are entered around the recording."""
    layers = list(dict.fromkeys(layers))
    record_kwargs.setdefault("functional", any("/" in str(name) for name in layers))
    with contextlib.ExitStack() as stack:
        # extra modes outermost: the recorder's own function mode then sees (and records) the
        # values they produce, e.g. a rectifier's output that is part of the modified graph
        for m in extra_modes:
            stack.enter_context(m)
        rec = stack.enter_context(record(model, layers, **record_kwargs))
        if stop_at is not None:
            stack.enter_context(_stop_after(model, stop_at))
        try:
            model(x)
        except _Stop:
            pass
    return rec


def trace_to(model: nn.Module, x: torch.Tensor, layer: str) -> Recording:
    """The engine's full recording (trace with receptive fields, switches, functional ops) of
    one inference pass stopped after ``layer``: enough to plan a deconvnet or read ``layer``'s
    receptive field, and it never runs a head that may not fit the input size."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return recorded_forward(model, x, [], layer, switches=True, trace=True, functional=True)
    finally:
        model.train(was_training)
