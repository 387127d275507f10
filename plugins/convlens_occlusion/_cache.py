"""Occlusion's fixed costs, paid once per model and input size within a process.

Before its sweep, :func:`~convlens_occlusion.occlusion_maps` finds the default layer (a traced
forward pass), traces the model with ``torch.fx``, checks the traced graph against the eager model
on one image, and tunes the sweep's thread count. None of these depend on the image, only on the
model, its weights and the input's shape, dtype and device, so they are kept here and reused by
later calls and by every image of a run:

* one :class:`ModelEntry` per (model, input shape, dtype, device), in a
  :class:`weakref.WeakKeyDictionary` on the model (the entry holds its engines, which hold the
  model only weakly: dropping the model drops its entry);
* an entry is valid for one *signature* of the model: the identity, storage address and version
  counter of every parameter and buffer, and every module's training flag. An in-place update
  (an optimiser step, ``load_state_dict``, ``copy_``), a replaced tensor or ``train()`` changes
  it, and the entry is rebuilt from scratch at the next call;
* :func:`clear` empties the cache (one model, or all).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from convlens.engine.precision import model_signature

from ._incremental import IncrementalOcclusion, UnsupportedModel, trace_graph

__all__ = ["ModelEntry", "entry_for", "clear", "signature"]

_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple, ModelEntry]] = weakref.WeakKeyDictionary()


def signature(model: nn.Module) -> tuple:
    """What a cached trace, validation and thread choice of ``model`` depend on
    (``convlens.engine.precision.model_signature``)."""
    return model_signature(model)


@dataclass
class ModelEntry:
    """The fixed costs of one model at one input shape/dtype/device.

    ``default_layer``: Fig. 7's layer (b) when none is given; ``max_numel``: the largest
    per-image activation (to size batched forwards); ``traced``: the ``torch.fx`` graph
    and its opaque submodules, or the reason tracing failed; ``engines``: incremental engines by
    (layer, call, full_above, fold_batchnorm, truncate), or the reason one cannot run (engines
    share the traced graph, so an image's unoccluded pass serves all of them); ``validated``: the
    engine keys whose graph reproduced the eager model's logits and layer; ``threads``: the
    sweep's thread choice per method; ``extras``: other per-model results (the deconv rule of
    panel (c) measured on the bundled photos); ``recording``: the engine's trace of one
    forward pass (``trace``)."""

    signature: tuple
    default_layer: str | None = None
    max_numel: int | None = None
    traced: tuple[Any, list[str]] | UnsupportedModel | None = None
    engines: dict[tuple, IncrementalOcclusion | UnsupportedModel] = field(default_factory=dict)
    validated: set[tuple] = field(default_factory=set)
    threads: dict[str, dict[str, Any]] = field(default_factory=dict)
    extras: dict[Any, Any] = field(default_factory=dict)
    recording: Any = None
    trace_output: tuple[torch.Tensor, torch.Tensor] | None = None

    def trace(self, model: nn.Module, x1: torch.Tensor):
        """The engine's trace of one forward pass in eval mode (layer calls, shapes, receptive
        fields: ``convlens.engine.traced_pass``, whose pass the report's overview reads back),
        made once per model and input size. The logits of that pass are kept with its image
        (``trace_output``) when the model is in eval mode: the graph check compares against them
        instead of another pass."""
        if self.recording is None:
            from convlens.engine.layers import traced_pass

            self.recording, out = traced_pass(model, x1[:1])
            if not model.training and isinstance(out, torch.Tensor):
                self.trace_output = (x1[:1].detach().clone(), out)
        return self.recording

    def engine(
        self,
        model: nn.Module,
        layer: str,
        call: int,
        full_above: float,
        fold_batchnorm: bool,
        truncate: float = 1.0,
    ) -> tuple[IncrementalOcclusion, tuple, bool]:
        """The engine for this layer and settings, ``(engine, key, cached)``; raises
        :class:`UnsupportedModel` (again, from the cache) when the model cannot run
        incrementally. ``truncate``: projective-field threshold τ (1: exact)."""
        key = (layer, int(call), float(full_above), bool(fold_batchnorm), float(truncate))
        found = self.engines.get(key)
        if isinstance(found, UnsupportedModel):
            raise found
        if found is not None:
            return found, key, True
        try:
            if self.traced is None:
                try:
                    self.traced = trace_graph(model)
                except UnsupportedModel as exc:
                    self.traced = exc
            if isinstance(self.traced, UnsupportedModel):
                raise self.traced
            engine = IncrementalOcclusion(
                model, layer, call, full_above, fold_batchnorm, traced=self.traced,
                truncate=truncate,
            )  # fmt: skip
        except UnsupportedModel as exc:
            self.engines[key] = exc
            raise
        self.engines[key] = engine
        return engine, key, False

    def reject(self, key: tuple, exc: UnsupportedModel) -> None:
        """Remember that the engine of ``key`` failed its check against the eager model."""
        self.engines[key] = exc
        self.validated.discard(key)


def entry_for(model: nn.Module, x: torch.Tensor) -> tuple[ModelEntry, bool]:
    """The cache entry of ``model`` for inputs shaped like ``x`` (``[N, C, H, W]``), and whether
    it was already there with the model's current signature."""
    key = (tuple(x.shape[1:]), x.dtype, str(x.device))
    sig = signature(model)
    per_model = _CACHE.get(model)
    if per_model is None:
        per_model = _CACHE[model] = {}
    entry = per_model.get(key)
    if entry is not None and entry.signature == sig:
        return entry, True
    if entry is not None:  # the weights or modes changed: nothing cached still holds
        per_model.clear()
    entry = per_model[key] = ModelEntry(sig)
    return entry, False


def clear(model: nn.Module | None = None) -> None:
    """Forget the cached traces, checks and thread choices of ``model`` (default: of all)."""
    if model is None:
        _CACHE.clear()
    else:
        _CACHE.pop(model, None)
