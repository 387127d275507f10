"""Layer addresses: aliases, qualified module names, repeated calls, functional ops.

An address is ``NAME`` or ``NAME:K``. ``NAME`` is an alias from ``model.convlens_aliases``
(``conv5`` → ``features.relu5`` for zfnet), a qualified module name (``features.3``,
``layer1.0.conv1``) or a functional op from the trace (``layer1.0/add``; ``/max_pool2d`` for one
in the root ``forward``). ``K`` selects the K-th call (0-based) of a module that runs several times.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

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
    "traced_pass",
    "top_conv_layer",
    "depth_layers",
    "unsaturated",
]

# Rectifiers with a ceiling: at the ceiling activations tie, and a gradient-gated rule is zero.
_SATURATING = ("relu6", "hardtanh")
_PASS_TYPES = ("identity", "dropout")

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


def _inference_pass(model: nn.Module, x: torch.Tensor, switches: bool) -> tuple[Any, Any]:
    """``(recording, output)`` of one eval-mode inference pass with the engine's trace; the
    model's training flag is restored. A convolution covering its input (VGG's fully connected
    layers) runs as the matrix product it is: no per-call weight reorder (``linear_convs``)."""
    from convlens.engine.linear_convs import ConvAsLinear
    from convlens.engine.recorder import record

    was_training = model.training
    model.eval()
    try:
        with (
            torch.inference_mode(),
            ConvAsLinear(),
            record(model, switches=switches, trace=True) as rec,
        ):
            out = model(x)
    finally:
        model.train(was_training)
    return rec, out


def trace_model(model: nn.Module, x: torch.Tensor | None = None):
    """Run one forward pass (on ``x``, or zeros of the model's input size) and return the
    :class:`~convlens.engine.recorder.Recording` with the full trace and receptive fields."""
    return _inference_pass(model, _example_input(model) if x is None else x, switches=True)[0]


# the latest traced pass of each model: (key, input, recording, output); weak on the model
_PASSES: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()


def traced_pass(model: nn.Module, x1: torch.Tensor) -> tuple[Any, Any]:
    """``(recording, output)`` of one eval-mode inference pass of ``model`` on ``x1``
    (``[1, C, H, W]``) with the engine's trace (layer calls, shapes, receptive fields; no
    activations or switches kept).

    Made once and shared: occlusion reads its default layer off this trace and checks its traced
    graph against this output, and the report's overview lists its layers and predictions from the
    same pass. A later call with the same weights and modes (``engine.precision.model_signature``)
    and an equal image returns the stored pair without running the model.
    Only the latest image of each model is kept; the model is held weakly."""
    from convlens.engine.precision import model_signature

    key = (model_signature(model), tuple(x1.shape), x1.dtype, str(x1.device))
    found = _PASSES.get(model)
    if found is not None and found[0] == key and torch.equal(found[1], x1):
        return found[2], found[3]
    rec, out = _inference_pass(model, x1, switches=False)
    rec.activations = {}
    rec.model = weakref.proxy(model)  # the stored pass must not keep the model alive
    _PASSES[model] = (key, x1.detach().clone(), rec, out)
    return rec, out


def top_conv_layer(model: nn.Module, rec=None) -> str:
    """The model's top convolutional layer: its ``conv{k}`` alias with the largest k where it has
    one, else the last leaf layer whose output is still a spatial map (H, W > 1), skipping
    pooling, dropout and identity layers. This is the layer Fig. 7 of the paper reads."""
    aliases = getattr(model, "convlens_aliases", {}) or {}
    convs = sorted((int(a[4:]), a) for a in aliases if a.startswith("conv") and a[4:].isdigit())
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


def _rf_share(rf, hw: tuple[int, int]) -> float:
    """The share of the input's side that a unit's receptive field covers (1.0: all of it)."""
    if rf is None or rf.is_global:
        return 1.0
    return min(1.0, max(rf.size[0] / max(hw[0], 1), rf.size[1] / max(hw[1], 1)))


def depth_layers(model: nn.Module, n: int = 5, rec=None) -> list[tuple[str, float]]:
    """About ``n`` layers spread by receptive-field size, shallow to deep, as ``(layer, share)``
    with ``share`` the part of the input's side one unit sees (the paper's "layers 1–5").

    Candidates: the ``conv1``…``convK`` aliases where the model has them (zfnet, alexnet); else
    its ``feature_info`` stages (timm) and its top conv layer, filled in with rectifiers and
    convolutions when they give fewer than ``n`` different field sizes; else every rectifier and
    convolution with a spatial output; a saturating rectifier's output stands for its input
    (:func:`unsaturated`). Candidates whose fields are the same size keep only the deepest. Among them, the first and the last, and between them the ones nearest to
    receptive-field shares spaced evenly on a log scale (ties: the deeper one)."""
    import math

    rec = rec or trace_model(model)
    hw = tuple((rec.input_shape or (1, 3, 224, 224))[-2:])
    aliases = getattr(model, "convlens_aliases", {}) or {}
    names = [a for _, a in sorted(
        (int(a[4:]), a) for a in aliases if a.startswith("conv") and a[4:].isdigit()
    )]  # fmt: skip
    if not names:
        for f in getattr(model, "feature_info", None) or []:
            name = f.get("module") if isinstance(f, dict) else getattr(f, "module", None)
            if name:
                names.append(name)
        if names:
            top = top_conv_layer(model, rec)
            if top not in names:
                names.append(top)
    leaves = []
    for call in rec.leaves():
        shape = call.output_shape
        if not shape or len(shape) != 4 or shape[-1] <= 1:
            continue
        t = call.type.lower()
        if "conv" in t or "relu" in t or "hardtanh" in t or "silu" in t or "gelu" in t:
            leaves.append(call.name)

    def candidates(names: list[str]) -> list[tuple[str, float, int]]:
        out: list[tuple[str, float, int]] = []
        for name in dict.fromkeys(names):
            try:
                call = rec.layer(name)
            except Exception:  # noqa: BLE001 - a tap that did not run is no candidate
                continue
            if len(call.output_shape or ()) != 4:  # tokens [N, L, C] or vectors: no map
                continue
            out.append((name, _rf_share(rec.rf(name), hw), call.index))
        out.sort(key=lambda c: c[2])
        # the same field twice (a stage and the activation that ends it): keep the deeper one
        return [c for i, c in enumerate(out) if i + 1 == len(out) or out[i + 1][1] > c[1] * 1.01]

    names = [unsaturated(rec, nm) for nm in names]
    leaves = [unsaturated(rec, nm) for nm in leaves]
    cands = candidates(names or leaves)
    if names and len(cands) < n and not aliases:  # too few stages: fill in from the leaves
        named = {c[0] for c in cands}
        shares = [c[1] for c in cands]
        extra = [
            name
            for name in leaves
            if name not in named
            and all(abs(_rf_share(rec.rf(name), hw) - v) > 0.05 for v in shares)
        ]
        cands = candidates([c[0] for c in cands] + extra)
    if len(cands) <= n:
        return [(c[0], c[1]) for c in cands]
    lo, hi = math.log(max(cands[0][1], 1e-6)), math.log(max(cands[-1][1], 1e-6))
    picked = {0, len(cands) - 1}
    for k in range(1, n - 1):
        target = lo + (hi - lo) * k / (n - 1)
        free = [i for i in range(len(cands)) if i not in picked]
        if not free:
            break
        best = min(free, key=lambda i: (abs(math.log(max(cands[i][1], 1e-6)) - target), -i))
        picked.add(best)
    return [(cands[i][0], cands[i][1]) for i in sorted(picked)]


def unsaturated(rec, name: str) -> str:
    """``name``, or — when that layer's output comes from a rectifier with a ceiling (ReLU6,
    hardtanh) — the layer that feeds the rectifier (its pre-activation, e.g. ``bn2/batch_norm``
    for timm's ``bn2.act``): at the ceiling the strongest activations all tie (6.0), and the
    guided rule, gated to the open interval (0, 6), projects every one of them to zero."""
    call = rec.layer(name)
    if not call.leaf:  # a container: its last leaf is what it returns
        inner = [c for c in rec.trace if c.leaf and c.index > call.index and c.depth > call.depth]
        after = [c for c in rec.trace if c.index > call.index and c.depth <= call.depth]
        end = after[0].index if after else len(rec.trace) + call.index + 1
        inner = [c for c in inner if c.index < end]
        if not inner:
            return name
        call = inner[-1]
    if not any(t in call.type.lower() for t in _SATURATING):
        return name
    leaves = [c for c in rec.trace if c.leaf and c.index < call.index]
    for prev in reversed(leaves):
        if any(t in prev.type.lower() for t in _PASS_TYPES):
            continue
        if tuple(prev.output_shape or ()) == tuple(call.input_shape or ()):
            return prev.name
        break
    return name
