"""Functional-op capture: a ``TorchFunctionMode`` that sees every torch call inside ``forward``.

Module hooks only see ``nn.Module`` calls; convnets also call ``F.max_pool2d``, ``F.relu``,
``x + shortcut`` or ``torch.flatten`` directly in ``forward``. While a recording is active this mode
intercepts those calls (including the ones made *by* modules, e.g. ``nn.MaxPool2d`` →
``F.max_pool2d``) to:

* record max-pooling switches: a ``max_pool2d`` call is run as ``max_pool2d_with_indices`` (the
  same values, the same gradient) and its argmax indices are kept — Zeiler & Fergus, Section 2.1
  and Fig. 1 (bottom): the deconvnet unpools with these switches;
* propagate receptive fields tensor to tensor (:mod:`convlens.engine.receptive`);
* report functional ops that run outside any leaf module as layers of their own, so that the layer
  trace of a model written with ``F.relu``/``F.max_pool2d`` is as complete as one written with
  modules.

Inside ``__torch_function__`` the mode is switched off by PyTorch, so nested calls are not seen
twice and the captured op runs exactly as it would without convlens.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from convlens.engine.receptive import ReceptiveField, conv_like, padded, union

__all__ = ["CaptureMode", "TRACED_FUNCTIONS", "function_name"]

# Functional ops that count as layers when they run outside a leaf module (by normalised name).
TRACED_FUNCTIONS = frozenset(
    """
    conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d linear bilinear
    max_pool1d max_pool2d max_pool3d max_pool2d_with_indices avg_pool1d avg_pool2d avg_pool3d
    adaptive_avg_pool1d adaptive_avg_pool2d adaptive_max_pool1d adaptive_max_pool2d lp_pool2d
    relu relu6 hardtanh leaky_relu elu selu celu gelu silu mish sigmoid tanh hardswish
    hardsigmoid softplus prelu rrelu glu softmax log_softmax
    batch_norm layer_norm group_norm instance_norm local_response_norm normalize
    dropout dropout2d dropout3d alpha_dropout
    add sub mul div truediv cat concat stack matmul mm bmm flatten view reshape mean sum amax
    pad interpolate upsample upsample_nearest upsample_bilinear pixel_shuffle
    """.split()
)

_POOL_WITH_SWITCHES = frozenset({"max_pool2d", "max_pool2d_with_indices"})
_WINDOWED = frozenset({"max_pool2d", "max_pool2d_with_indices", "avg_pool2d", "lp_pool2d"})


def function_name(func: Callable) -> str:
    """Normalised name of a torch function: ``Tensor.__iadd__`` → ``add``, ``relu_`` → ``relu``."""
    name = getattr(func, "__name__", None) or type(func).__name__
    name = name.strip("_")
    if name in {"iadd", "isub", "imul", "itruediv", "radd", "rsub", "rmul", "rtruediv"}:
        name = name[1:]
    return name


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _tensors(obj: Any, out: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Tensors in an argument structure (tuples and lists, one level of nesting is enough)."""
    out = [] if out is None else out
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            if isinstance(item, torch.Tensor):
                out.append(item)
            elif isinstance(item, (list, tuple)):
                _tensors(item, out)
    return out


class FieldMap:
    """Receptive field of each live tensor, keyed by identity (never by value)."""

    def __init__(self) -> None:
        self._map: dict[int, tuple[weakref.ref, ReceptiveField]] = {}
        self.input_hw: tuple[int, int] | None = None

    def get(self, t: torch.Tensor) -> ReceptiveField | None:
        entry = self._map.get(id(t))
        if entry is None or entry[0]() is not t:
            return None
        return entry[1]

    def set(self, t: torch.Tensor, rf: ReceptiveField | None) -> None:
        if rf is None:
            self._map.pop(id(t), None)
            return
        try:
            ref = weakref.ref(t)
        except TypeError:  # pragma: no cover - tensors are weak-referenceable
            return
        self._map[id(t)] = (ref, rf)

    def clear(self) -> None:
        self._map.clear()
        self.input_hw = None


def propagate(
    fields: FieldMap, name: str, args: tuple, kwargs: dict, result: Any
) -> ReceptiveField | None:
    """Receptive field of ``result`` from the op's name, its arguments and its inputs' fields."""
    inputs = [t for t in _tensors(args) + _tensors(list(kwargs.values())) if fields.get(t)]
    if not inputs:
        return None
    outs = _tensors(result)
    if not outs:
        return None
    out = outs[0]
    in_fields = [fields.get(t) for t in inputs]
    if any(f.is_global for f in in_fields) and out.dim() < 4:
        return next(f for f in in_fields if f.is_global)
    first = inputs[0]
    if out.dim() < 4 or first.dim() < 4:
        if fields.input_hw is not None and first.dim() >= 4:
            return ReceptiveField.whole(fields.input_hw)
        return None
    rf_in = fields.get(first)
    in_hw, out_hw = tuple(first.shape[-2:]), tuple(out.shape[-2:])
    if name == "conv2d":
        weight = _arg(args, kwargs, 1, "weight")
        k = tuple(weight.shape[-2:])
        d = _arg(args, kwargs, 5, "dilation", 1)
        p = _arg(args, kwargs, 4, "padding", 0)
        if isinstance(p, str):
            dd = (d, d) if isinstance(d, int) else tuple(d)
            p = (0, 0) if p == "valid" else tuple(dd[i] * (k[i] - 1) // 2 for i in range(2))
        return conv_like(rf_in, k, _arg(args, kwargs, 3, "stride", 1), p, d)
    if name in _WINDOWED:
        if name == "lp_pool2d":  # (input, norm_type, kernel_size, stride, ceil_mode)
            k = _arg(args, kwargs, 2, "kernel_size")
            s = _arg(args, kwargs, 3, "stride")
            return conv_like(rf_in, k, s, 0, 1)
        k = _arg(args, kwargs, 1, "kernel_size")
        s = _arg(args, kwargs, 2, "stride")
        p = _arg(args, kwargs, 3, "padding", 0)
        d = _arg(args, kwargs, 4, "dilation", 1) if name != "avg_pool2d" else 1
        return conv_like(rf_in, k, s, p, d)
    if name in ("adaptive_avg_pool2d", "adaptive_max_pool2d"):
        if out_hw == (1, 1):
            return ReceptiveField.whole(fields.input_hw or in_hw)
        s = tuple(max(1, in_hw[i] // out_hw[i]) for i in range(2))
        k = tuple(in_hw[i] - (out_hw[i] - 1) * s[i] for i in range(2))
        return conv_like(rf_in, k, s, 0, 1)
    if name == "pad":
        pads = list(_arg(args, kwargs, 1, "pad"))
        left = pads[0] if len(pads) >= 1 else 0
        top = pads[2] if len(pads) >= 4 else 0
        return padded(rf_in, top, left)
    # Shape-preserving and element-wise ops: union of the inputs at the output's resolution,
    # leaving out 1x1 gates broadcast onto larger maps (squeeze-and-excitation).
    same = [fields.get(t) for t in inputs if t.dim() >= 4 and tuple(t.shape[-2:]) == out_hw]
    if same:
        return union(same)
    if out_hw == (1, 1):  # a reduction over space (x.mean((2, 3), keepdim=True))
        return ReceptiveField.whole(fields.input_hw or in_hw)
    return None


class CaptureMode(TorchFunctionMode):
    """The recording's view of every torch call; see the module docstring.

    ``on_call(name, func, args, kwargs, result)`` is called after each op with the normalised
    name; it returns nothing. ``on_switch(args, kwargs, result, indices)`` is called for every
    max-pooling.
    """

    def __init__(
        self,
        fields: FieldMap | None,
        on_call: Callable[[str, Any, tuple, dict, Any], None] | None,
        on_switch: Callable[[tuple, dict, Any, torch.Tensor], None] | None,
    ) -> None:
        super().__init__()
        self.fields = fields
        self.on_call = on_call
        self.on_switch = on_switch

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        name = function_name(func)
        if name in _POOL_WITH_SWITCHES and self.on_switch is not None:
            result, indices = self._pool_with_switches(func, name, args, kwargs)
            self.on_switch(args, kwargs, result, indices)
        else:
            result = func(*args, **kwargs)
        if self.fields is not None and isinstance(result, (torch.Tensor, tuple, list)):
            rf = propagate(self.fields, name, args, kwargs, result)
            for t in _tensors(result)[:1]:
                self.fields.set(t, rf)
        if self.on_call is not None and name in TRACED_FUNCTIONS:
            self.on_call(name, func, args, kwargs, result)
        return result

    @staticmethod
    def _pool_with_switches(func, name: str, args: tuple, kwargs: dict):
        """Run a max-pooling as ``max_pool2d_with_indices``; return (caller's result, indices)."""
        x = args[0] if args else kwargs["input"]
        k = _arg(args, kwargs, 1, "kernel_size")
        s = _arg(args, kwargs, 2, "stride", None)
        p = _arg(args, kwargs, 3, "padding", 0)
        d = _arg(args, kwargs, 4, "dilation", 1)
        ceil = _arg(args, kwargs, 5, "ceil_mode", False)
        wanted = name == "max_pool2d_with_indices" or bool(
            _arg(args, kwargs, 6, "return_indices", False)
        )
        out, idx = F.max_pool2d_with_indices(
            x, k, s if s not in (None, (), []) else None, p, d, ceil_mode=ceil, return_indices=True
        )
        return ((out, idx) if wanted else out), idx
