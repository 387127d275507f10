"""Feature vectors at named layers, and the paper's layer numbers mapped onto any convnet.

Shared by the correspondence probe (Section 4.3, Table 1: layers 5 and 7) and the invariance
probe (Section 4, Fig. 5: layers 1 and 7), which imports it from here.

* :func:`extract` runs a model over a batch in chunks and returns, per layer, each image's
  activation flattened into one feature vector (the ``x_i^l`` of Section 4.3), plus the logits.
  It uses the engine's :func:`convlens.record` with nothing but activation hooks (no function
  mode, no trace), so the numbers are exactly what the model computes.
* :func:`paper_layer` maps "layer 1", "layer 5" and "layer 7" of the ZFNet of Fig. 3 onto a model:
  its ``conv1``/``conv5``/``fc7`` aliases where it has them (zfnet, alexnet), else the first
  convolution block's activation, the top convolutional layer
  (:func:`convlens.engine.top_conv_layer`) and the penultimate (pre-classifier) layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from convlens import record
from convlens.engine import resolve_layers, top_conv_layer, trace_model
from convlens.engine.recorder import LayerCall, Recording
from convlens.errors import ConvlensError, LayerNotFoundError

__all__ = [
    "extract",
    "paper_layer",
    "paper_layers",
    "first_block_layer",
    "penultimate_layer",
    "DEFAULT_BATCH",
]

#: Images per forward pass in :func:`extract`.
DEFAULT_BATCH = 16

# Types skipped when looking for the layer that feeds the classifier: they do not change values
# (eval-mode dropout, identity) or only reshape them.
_PASS_THROUGH = ("dropout", "identity", "flatten", "view", "reshape")
_ACTIVATIONS = frozenset(
    "relu relu6 leakyrelu leaky_relu elu selu celu gelu silu swish mish hardswish hardtanh "
    "prelu rrelu softplus sigmoid tanh hardsigmoid".split()
)
_CONV_TYPES = ("conv", "Conv")


def _lower(call: LayerCall) -> str:
    return call.type.lower()


def _is_pass_through(call: LayerCall) -> bool:
    t = _lower(call)
    return any(p in t for p in _PASS_THROUGH)


def _is_conv(call: LayerCall) -> bool:
    return call.type.startswith(_CONV_TYPES) and "transpose" not in _lower(call)


def _is_activation(call: LayerCall) -> bool:
    t = _lower(call)
    return t in _ACTIVATIONS or t.rstrip("_") in _ACTIVATIONS


def first_block_layer(model: nn.Module, rec: Recording | None = None) -> str:
    """The paper's layer 1: the ``conv1`` alias, else the activation that follows the first
    convolution (BatchNorm between them allowed), else that convolution itself."""
    aliases = getattr(model, "convlens_aliases", {}) or {}
    if "conv1" in aliases:
        return "conv1"
    rec = rec or trace_model(model)
    leaves = rec.leaves()
    for k, call in enumerate(leaves):
        if not _is_conv(call):
            continue
        for nxt in leaves[k + 1 :]:
            if _is_activation(nxt) and nxt.output_shape == call.output_shape:
                return nxt.name
            if _is_conv(nxt) or "linear" in _lower(nxt) or "pool" in _lower(nxt):
                break
        return call.name
    raise LayerNotFoundError(f"{type(model).__name__} has no convolution layer")


def penultimate_layer(model: nn.Module, rec: Recording | None = None) -> str:
    """The paper's layer 7: the ``fc7`` alias, else the layer whose output feeds the last
    layer (the classifier), skipping dropout, identity and reshapes."""
    aliases = getattr(model, "convlens_aliases", {}) or {}
    if "fc7" in aliases:
        return "fc7"
    rec = rec or trace_model(model)
    leaves = rec.leaves()
    if len(leaves) < 2:
        raise LayerNotFoundError(f"{type(model).__name__} has no layer before its output layer")
    for call in reversed(leaves[:-1]):
        if not _is_pass_through(call):
            return call.name
    raise LayerNotFoundError(f"{type(model).__name__} has no layer before its output layer")


def paper_layer(model: nn.Module, number: int, rec: Recording | None = None) -> str:
    """The model's equivalent of ZFNet's layer ``number`` (1, 5 or 7)."""
    aliases = getattr(model, "convlens_aliases", {}) or {}
    if number == 1:
        return first_block_layer(model, rec)
    if number == 5:
        return "conv5" if "conv5" in aliases else top_conv_layer(model, rec)
    if number == 7:
        return penultimate_layer(model, rec)
    raise ConvlensError(f"paper layer {number}: only layers 1, 5 and 7 have equivalents")


def paper_layers(
    model: nn.Module, numbers: Sequence[int], example: torch.Tensor | None = None
) -> list[str]:
    """:func:`paper_layer` for several numbers, tracing the model once (on ``example``)."""
    aliases = getattr(model, "convlens_aliases", {}) or {}
    need_trace = any(
        not (n == 1 and "conv1" in aliases)
        and not (n == 5 and "conv5" in aliases)
        and not (n == 7 and "fc7" in aliases)
        for n in numbers
    )
    rec = trace_model(model, example) if need_trace else None
    return [paper_layer(model, n, rec) for n in numbers]


@torch.inference_mode()
def extract(
    model: nn.Module,
    x: torch.Tensor,
    layers: Sequence[str],
    *,
    device: torch.device | str | None = None,
    batch_size: int = DEFAULT_BATCH,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Run ``model`` on ``x`` ``[N, 3, H, W]`` and return ``({layer: [N, D] float32}, logits)``,
    both on the CPU; ``D`` is the layer's activation size per image (all its units, flattened).

    Images go through in chunks of ``batch_size``. Two calls with the same ``N`` and
    ``batch_size`` run every image in an identically shaped batch, so an image that is the same
    in both calls gives bit-identical features (needed for exact zeros in Section 4.3's
    ``sign(x - x~)``).
    """
    if x.dim() != 4:
        raise ConvlensError(f"expected images [N, 3, H, W], got shape {list(x.shape)}")
    layers = list(layers)
    refs = resolve_layers(model, layers)
    functional = any(r.is_function for r in refs)
    if device is None:
        try:
            device = next(model.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
    feats: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    logits: list[torch.Tensor] = []
    for start in range(0, x.shape[0], max(1, batch_size)):
        chunk = x[start : start + batch_size].to(device)
        with record(model, layers, switches=False, trace=False, functional=functional) as rec:
            out = model(chunk)
        for name in layers:
            feats[name].append(rec[name].reshape(chunk.shape[0], -1).float().cpu())
        if isinstance(out, (tuple, list)):
            out = out[0]
        logits.append(out.reshape(chunk.shape[0], -1).float().cpu())
    return {k: torch.cat(v) for k, v in feats.items()}, torch.cat(logits)
