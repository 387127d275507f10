"""Incremental inference for occlusion: recompute only what the grey square changes.

An occluder changes a box of the input; a convolution or pooling window changes, in its output,
only the units whose window reaches into that box; a spatially pointwise layer (ReLU, eval-mode
BatchNorm, cross-channel LRN, dropout at eval) changes the same box it receives; an element-wise
sum of two changed maps (a residual connection) changes the union of their boxes. Krypton
(Nakandala, Kumar & Papakonstantinou, "Incremental and Approximate Inference for Faster Occlusion-
based Deep CNN Explanations", SIGMOD 2019) runs each layer only on that box, from the activations of
the unoccluded image cached once, for a batch of occluder positions at a time. This module does the
same, exactly (no approximation), for any model torch.fx can trace:

* The model is traced into a graph (a submodule that cannot be traced becomes an opaque node that
  runs in full). The graph is run once per image on the unoccluded input and every value is cached;
  the graph's logits (and the probed layer) are checked against the eager model's before use.
* A *plan* gives each node of the graph an action: ``local`` (conv / max / avg pooling on a patch),
  ``pointwise`` (a per-pixel op on a patch), ``union`` (sum of two patches), or ``run`` (the ordinary
  op on full maps). A patch has the same size for every position (the largest changed box,
  shifted inside the map near its borders, which only recomputes a few unchanged units), so
  positions batch. A node whose box would cover more than ``full_above`` of its map runs in full;
  so does everything downstream of global pooling, flatten, linear layers, squeeze-excitation
  gates, and any op not listed above.
* A ``local`` node gathers, per position, its input window from the cached map (padded as the op
  pads: zeros for convolutions, −inf for max pooling, including the extra rows ceil mode reads) with
  the changed patch pasted in, and runs the op with no padding on that window. Borders and padding
  are therefore exact. Where a full map is needed, the patch is scattered into a copy of the cached
  map.

Everything computed this way equals the full forward pass up to float rounding (convolution on a
patch sums in a different order); the tests compare it with a naive loop and with Captum.
"""

from __future__ import annotations

import math
import operator
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from convlens.engine.linear_convs import ConvAsLinear as _ConvAsLinear
from convlens.engine.linear_convs import LinearConv as _Linear
from convlens.engine.linear_convs import covers_input as _covers_input
from convlens.errors import ConvlensError

__all__ = ["IncrementalOcclusion", "UnsupportedModel", "trace_graph"]


#: Actions a node of the tail may have (everything there runs on full maps).
_TAIL_ACTIONS = frozenset({"const", "run", "run_folded", "run_linear", "meta", "alias", "output"})

#: Plans kept per engine (one per group of positions and grid; see ``_compute._groups``).
PLANS_KEPT = 64


class UnsupportedModel(ConvlensError):
    """The incremental path cannot run this model (the batched path still can)."""


def check_truncate(truncate: Any) -> float:
    """τ of projective-field truncation as a float in (0, 1], or a one-line error."""
    try:
        value = float(truncate)
    except (TypeError, ValueError):
        value = math.nan
    if not 0.0 < value <= 1.0:  # also rejects NaN
        raise ConvlensError(
            f"occlusion truncate {truncate!r}: the projective-field threshold must lie in (0, 1] "
            "(1 = exact)"
        )
    return value


# --------------------------------------------------------------------------------------------
# Tracing
# --------------------------------------------------------------------------------------------


class _Tracer(fx.Tracer):
    """``torch.fx`` tracer that makes a submodule opaque (one node, run in full) when its own
    forward cannot be traced (shape-dependent control flow, unsupported Python), instead of
    failing the whole model."""

    def __init__(self) -> None:
        super().__init__()
        self.forced_leaves: set[str] = set()
        self.opaque: list[str] = []
        self._param_cache: dict[str, Any] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.forced_leaves:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        self._param_cache = parameter_proxy_cache
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        qual = self.path_of_module(m)
        if self.is_leaf_module(m, qual):
            return super().call_module(m, forward, args, kwargs)
        n_before = len(self.graph.nodes)
        stack = OrderedDict(self.module_stack)
        calls = dict(self.num_calls)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:  # noqa: BLE001 - any failure inside: make the module opaque
            created = list(self.graph.nodes)[n_before:]
            for node in reversed(created):
                self.graph.erase_node(node)
            if self._param_cache is not None:
                gone = set(created)
                for key in [k for k, p in self._param_cache.items() if p.node in gone]:
                    del self._param_cache[key]
            self.module_stack.clear()
            self.module_stack.update(stack)
            self.num_calls.clear()
            self.num_calls.update(calls)
            self.forced_leaves.add(qual)
            self.opaque.append(qual)
            return super().call_module(m, forward, args, kwargs)


def trace_graph(model: nn.Module) -> tuple[fx.Graph, list[str]]:
    """The model's fx graph and the submodules kept opaque. Raises :class:`UnsupportedModel`."""
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # noqa: BLE001
        raise UnsupportedModel(
            f"{type(model).__name__}: torch.fx cannot trace its forward ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:120] if str(exc) else ''})"
        ) from None
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UnsupportedModel(
            f"{type(model).__name__}: forward takes {len(placeholders)} inputs, expected one image"
        )
    return graph, tracer.opaque


# --------------------------------------------------------------------------------------------
# What each op does to a changed box
# --------------------------------------------------------------------------------------------


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(a) for a in v)
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


def _bind(names: tuple[str, ...], defaults: dict[str, Any], args: tuple, kwargs: dict) -> dict:
    out = dict(defaults)
    out.update(zip(names, args, strict=False))
    out.update(kwargs)
    return out


_POINTWISE_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus,
    nn.Identity, nn.LocalResponseNorm,
)  # fmt: skip
_EVAL_POINTWISE_MODULES: tuple[type, ...] = (
    nn.Dropout, nn.Dropout2d, nn.AlphaDropout, nn.BatchNorm2d,
)  # fmt: skip

_POINTWISE_FUNCTIONS: set[Any] = {
    F.relu, torch.relu, F.relu_, torch.relu_, F.relu6, F.hardtanh, F.leaky_relu, F.elu, F.selu,
    F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, torch.sigmoid, F.sigmoid, torch.tanh,
    F.tanh, F.softplus, torch.clamp, torch.clip, torch.abs, torch.exp, torch.neg, operator.neg,
    F.local_response_norm,
}  # fmt: skip
_POINTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clamp_min",
    "clamp_min_", "clamp_max", "clamp_max_", "abs", "exp", "neg", "contiguous",
}  # fmt: skip
_BINARY_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
    operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div,
}  # fmt: skip
_BINARY_METHODS = {"add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_"}
_INPLACE_FUNCTIONS = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, F.relu_, torch.relu_,
}  # fmt: skip
_SHAPE_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda", "layout"}
_SHAPE_METHODS = {"size", "dim"}


@dataclass(frozen=True)
class _Window:
    """A convolution / pooling window: run ``apply`` on an input window padded as the op pads."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    pad: tuple[int, int]  # top, left (bottom/right follow from the output size)
    pad_value: float
    apply: Callable[[torch.Tensor], torch.Tensor]
    what: str


@dataclass(frozen=True)
class _Folded:
    """A convolution with the eval-mode BatchNorm that alone reads it folded into its weights:
    ``bn(conv(x, W, b)) = conv(x, W·s, (b − μ)·s + β)`` with ``s = γ / √(σ² + ε)``."""

    bn: fx.Node
    weight: torch.Tensor
    bias: torch.Tensor
    stride: Any
    padding: Any
    dilation: Any
    groups: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)  # fmt: skip


def _bn_params(node: fx.Node, module: nn.Module | None, consts: Callable):
    """(mean, var, weight, bias, eps) of an eval-mode batch norm node, or None."""
    if module is not None:
        if type(module) is not nn.BatchNorm2d or module.training:
            return None
        if module.running_mean is None or module.running_var is None:
            return None
        return (module.running_mean, module.running_var, module.weight, module.bias, module.eps)
    if node.op == "call_function" and node.target is F.batch_norm:
        b = _bind(
            ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum",
             "eps"),
            {"weight": None, "bias": None, "training": False, "eps": 1e-5},
            tuple(consts(a) for a in node.args), {k: consts(v) for k, v in node.kwargs.items()},
        )  # fmt: skip
        if b["training"] or not isinstance(b["running_mean"], torch.Tensor):
            return None
        return (b["running_mean"], b["running_var"], b["weight"], b["bias"], float(b["eps"]))
    return None


def _conv_params(node: fx.Node, module: nn.Module | None, consts: Callable):
    """(weight, bias, stride, padding, dilation, groups) of a zero-padded 2-d convolution."""
    if module is not None:
        if type(module) is not nn.Conv2d or module.padding_mode != "zeros":
            return None
        m = module
        return (m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)
    if node.op == "call_function" and node.target in (F.conv2d, torch.conv2d):
        b = _bind(
            ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
            {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1},
            tuple(consts(a) for a in node.args), {k: consts(v) for k, v in node.kwargs.items()},
        )  # fmt: skip
        if not isinstance(b["weight"], torch.Tensor):
            return None
        return (b["weight"], b["bias"], b["stride"], b["padding"], b["dilation"], b["groups"])
    return None


def _fold(conv, bn) -> tuple[torch.Tensor, torch.Tensor]:
    weight, bias = conv[0], conv[1]
    mean, var, gamma, beta, eps = bn
    w64 = weight.detach().double()
    scale = torch.rsqrt(var.detach().double() + eps)
    if gamma is not None:
        scale = scale * gamma.detach().double()
    b64 = bias.detach().double() if bias is not None else torch.zeros_like(scale)
    shift = (b64 - mean.detach().double()) * scale
    if beta is not None:
        shift = shift + beta.detach().double()
    w = (w64 * scale.view(-1, 1, 1, 1)).to(weight.dtype)
    return w, shift.to(weight.dtype)


def _conv_padding(padding: Any, kernel: tuple[int, int], dilation: tuple[int, int]):
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0)
        if padding == "same":
            return tuple((dilation[i] * (kernel[i] - 1)) // 2 for i in range(2))
        return None
    return _pair(padding)


def _window_of(
    node: fx.Node, module: nn.Module | None, consts: Callable, folded: _Folded | None = None
) -> _Window | None:
    """The window spec of a conv/pool node, or None if it is not one convlens can patch.
    ``folded``: the convolution's weights with the following BatchNorm folded in."""
    if module is not None:
        t = type(module)
        if t is nn.Conv2d:
            m = module
            if m.padding_mode != "zeros":
                return None
            k, d, s = _pair(m.kernel_size), _pair(m.dilation), _pair(m.stride)
            pad = _conv_padding(m.padding, k, d)
            if pad is None:
                return None
            wt, bs = (folded.weight, folded.bias) if folded else (m.weight, m.bias)
            return _Window(
                k, s, d, pad, 0.0,
                lambda w, wt=wt, bs=bs, s=s, d=d, g=m.groups: F.conv2d(w, wt, bs, s, 0, d, g),
                "conv",
            )  # fmt: skip
        if t is nn.MaxPool2d:
            m = module
            if m.return_indices:
                return None
            k = _pair(m.kernel_size)
            s = _pair(m.stride if m.stride not in (None, ()) else m.kernel_size)
            d = _pair(m.dilation)
            return _Window(
                k, s, d, _pair(m.padding), -math.inf,
                lambda w, k=k, s=s, d=d: F.max_pool2d(w, k, s, 0, d),
                "max_pool",
            )  # fmt: skip
        if t is nn.AvgPool2d:
            m = module
            return _avg_window(
                m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
                m.divisor_override,
            )  # fmt: skip
        return None
    if node.op != "call_function":
        return None
    args = tuple(consts(a) for a in node.args[1:])
    kwargs = {k: consts(v) for k, v in node.kwargs.items()}
    if node.target is F.conv2d or node.target is torch.conv2d:
        b = _bind(
            ("weight", "bias", "stride", "padding", "dilation", "groups"),
            {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1},
            args, kwargs,
        )  # fmt: skip
        weight = b["weight"]
        if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
            return None
        k, d, s = tuple(weight.shape[-2:]), _pair(b["dilation"]), _pair(b["stride"])
        pad = _conv_padding(b["padding"], k, d)
        if pad is None:
            return None
        wt, bs = (folded.weight, folded.bias) if folded else (weight, b["bias"])
        return _Window(
            k, s, d, pad, 0.0,
            lambda w, wt=wt, bs=bs, s=s, d=d, g=b["groups"]: F.conv2d(w, wt, bs, s, 0, d, g),
            "conv",
        )  # fmt: skip
    if node.target is F.max_pool2d:
        b = _bind(
            ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
            {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False,
             "return_indices": False},
            args, kwargs,
        )  # fmt: skip
        if b["return_indices"]:
            return None
        k = _pair(b["kernel_size"])
        s = _pair(b["stride"] if b["stride"] not in (None, ()) else b["kernel_size"])
        d = _pair(b["dilation"])
        return _Window(
            k, s, d, _pair(b["padding"]), -math.inf,
            lambda w, k=k, s=s, d=d: F.max_pool2d(w, k, s, 0, d),
            "max_pool",
        )  # fmt: skip
    if node.target is F.avg_pool2d:
        b = _bind(
            ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
             "divisor_override"),
            {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True,
             "divisor_override": None},
            args, kwargs,
        )  # fmt: skip
        return _avg_window(
            b["kernel_size"], b["stride"], b["padding"], b["ceil_mode"], b["count_include_pad"],
            b["divisor_override"],
        )  # fmt: skip
    return None


def _avg_window(kernel, stride, padding, ceil_mode, count_include_pad, divisor) -> _Window | None:
    k = _pair(kernel)
    s = _pair(stride if stride not in (None, ()) else kernel)
    p = _pair(padding)
    if any(p) and not count_include_pad:
        return None  # the divisor would depend on the border: not a fixed window op
    # ceil mode reads past the padded input and averages over fewer cells there: checked
    # against the output size when planning (see _plan_local), rejected if it happens.
    return _Window(
        k, s, (1, 1), p, 0.0,
        lambda w, k=k, s=s, dv=divisor: F.avg_pool2d(w, k, s, 0, False, True, dv),
        "avg_pool" if not ceil_mode else "avg_pool_ceil",
    )  # fmt: skip


def _is_eval_pointwise_function(node: fx.Node, consts: Callable) -> bool:
    if node.target is F.batch_norm:
        b = _bind(
            ("input", "running_mean", "running_var", "weight", "bias", "training"),
            {"training": False}, node.args, node.kwargs,
        )  # fmt: skip
        rm = consts(b["running_mean"])
        return not consts(b["training"]) and isinstance(rm, torch.Tensor)
    if node.target in (F.dropout, F.dropout2d, F.alpha_dropout):
        b = _bind(("input", "p", "training", "inplace"), {"training": True}, node.args, node.kwargs)
        return not consts(b["training"])
    return False


def _is_inplace(node: fx.Node, module: nn.Module | None) -> bool:
    if node.op == "call_module":
        return bool(getattr(module, "inplace", False))
    if node.op == "call_method":
        return str(node.target).endswith("_")
    if node.op == "call_function":
        if node.target in _INPLACE_FUNCTIONS or node.kwargs.get("inplace") is True:
            return True
        name = getattr(node.target, "__name__", "")
        return name.endswith("_") and not name.startswith("_")
    return False


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


@dataclass
class Geom:
    """The changed box of one node's output map for every position: ``h``×``w`` at ``(oy, ox)``
    (each ``[P]``), inside an ``H``×``W`` map."""

    h: int
    w: int
    oy: torch.Tensor
    ox: torch.Tensor
    H: int
    W: int
    nhwc: bool = False  # the map is channels-last in its shape, ``[N, H, W, C]`` (ConvNeXt)
    #: with projective-field truncation only: per position the changed box itself, (first unit,
    #: length) per axis; the patch ``h``×``w`` at ``(oy, ox)`` contains it
    box_y: tuple[torch.Tensor, torch.Tensor] | None = None
    box_x: tuple[torch.Tensor, torch.Tensor] | None = None

    def boxes(self) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """Per position the changed box, ``((y0, h), (x0, w))`` (the patch when not tracked)."""
        by = self.box_y or (self.oy, torch.full_like(self.oy, self.h))
        bx = self.box_x or (self.ox, torch.full_like(self.ox, self.w))
        return by, bx

    @property
    def fraction(self) -> float:
        return (self.h * self.w) / float(self.H * self.W)

    def same_as(self, other: Geom) -> bool:
        return (
            self.h == other.h
            and self.w == other.w
            and bool(torch.equal(self.oy, other.oy))
            and bool(torch.equal(self.ox, other.ox))
        )


def _floordiv(a: torch.Tensor, b: int) -> torch.Tensor:
    return torch.div(a, b, rounding_mode="floor")


def _axis_box(o: torch.Tensor, size: int, k: int, s: int, d: int, pad: int, out_size: int):
    """Output rows changed by input rows ``[o, o + size)``, per position: first row and count."""
    lo = -_floordiv(-(o + pad - d * (k - 1)), s)  # ceil
    hi = _floordiv(o + size - 1 + pad, s)
    lo_c = lo.clamp(0, out_size - 1)
    hi_c = hi.clamp(0, out_size - 1)
    return lo_c, (hi_c - lo_c + 1).clamp_min(1)


def _axis_out(o: torch.Tensor, size: int, k: int, s: int, d: int, pad: int, out_size: int):
    """Output rows changed by input rows ``[o, o + size)``: per-position origin and common size."""
    lo = -_floordiv(-(o + pad - d * (k - 1)), s)  # ceil
    hi = _floordiv(o + size - 1 + pad, s)
    lo_c = lo.clamp(0, out_size - 1)
    hi_c = hi.clamp(0, out_size - 1)
    count = int((hi_c - lo_c + 1).clamp_min(1).max())
    count = min(count, out_size)
    origin = lo_c.clamp(max=out_size - count)
    return origin, count


def _union_axis(oa, ha, ob, hb, size):
    lo = torch.minimum(oa, ob)
    hi = torch.maximum(oa + ha, ob + hb)
    count = min(int((hi - lo).max()), size)
    return lo.clamp(max=size - count), count


def truncation_cap(truncate: float, size: int) -> int:
    """Krypton's projective-field threshold on one axis of a map of ``size`` units: a changed
    box may span at most ``⌈τ · size⌉`` units (at least one)."""
    return max(1, min(size, math.ceil(truncate * size - 1e-9)))


def _truncate_axis(lo: torch.Tensor, length: torch.Tensor, cap: int, size: int):
    """Projective-field truncation on one axis (Krypton SIGMOD 2019, Sec. 4): per position the
    changed box ``[lo, lo + length)``; a box longer than ``cap`` units is cut to the ``cap`` units
    centred on it (clamped inside the map), a shorter one is kept. Returns first units and
    lengths."""
    cut = length > cap
    centred = (lo + torch.div(length - cap, 2, rounding_mode="floor")).clamp(0, size - cap)
    return torch.where(cut, centred, lo), length.clamp(max=cap)


def _common(lo: torch.Tensor, length: torch.Tensor, size: int) -> tuple[torch.Tensor, int]:
    """One patch size for all positions (the longest box) and per position an origin whose
    patch contains the position's box."""
    count = int(length.max()) if length.numel() else 1
    return lo.clamp(max=size - count), count


# --------------------------------------------------------------------------------------------
# The plan and its execution
# --------------------------------------------------------------------------------------------


@dataclass
class _Patch:
    """One node's value for a batch of positions: the cached map ``base`` (``[1, C, H, W]``)
    everywhere except each position's box, whose values are ``data`` (``[B, C, h, w]``)."""

    data: torch.Tensor
    oy: torch.Tensor
    ox: torch.Tensor
    base: torch.Tensor
    nhwc: bool = False  # ``base`` is ``[1, H, W, C]`` and ``data`` ``[B, h, w, C]``


@dataclass
class ImageCache:
    """The unoccluded pass of one image: every node's value, and maps derived from them
    (padded copies for window gathers, integral images for channel sums)."""

    values: dict[fx.Node, Any]
    pads: dict[Any, Any] = field(default_factory=dict)
    integrals: dict[Any, torch.Tensor] = field(default_factory=dict)


@dataclass
class NodeReport:
    """How one layer ran: ``patch`` (incremental, on ``fraction`` of its map) or ``full``."""

    name: str
    op: str
    mode: str
    fraction: float
    shape: tuple[int, ...]

    def to_dict(self) -> dict:
        return {
            "node": self.name,
            "op": self.op,
            "mode": self.mode,
            "fraction": round(self.fraction, 4),
            "output_shape": list(self.shape[1:]),
        }


@dataclass
class _Plan:
    actions: dict[fx.Node, tuple[str, Any]] = field(default_factory=dict)
    geoms: dict[fx.Node, Geom] = field(default_factory=dict)
    report: list[NodeReport] = field(default_factory=list)
    folded: int = 0
    tail: int | None = None  # first node of the tail (``tail_start``; -1: none), once known
    #: nodes whose changed box projective-field truncation cut for at least one position
    truncated: list[fx.Node] = field(default_factory=list)


def _contains_tensor(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        return True
    if isinstance(v, (list, tuple)):
        return any(_contains_tensor(a) for a in v)
    if isinstance(v, dict):
        return any(_contains_tensor(a) for a in v.values())
    return False


def _clone(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    if isinstance(v, tuple):
        return tuple(_clone(a) for a in v)
    if isinstance(v, list):
        return [_clone(a) for a in v]
    return v


def _node_label(node: fx.Node) -> str:
    if node.op in ("call_module", "get_attr"):
        return str(node.target)
    if node.op == "call_method":
        return f"{node.name} (.{node.target})"
    return f"{node.name} ({getattr(node.target, '__name__', node.target)})"


class IncrementalOcclusion:
    """Occlusion forward passes of ``model`` computed incrementally (see the module docstring).

    ``feature_layer``/``feature_call``: the layer (module name, or ``parent/op`` for a functional
    op, and its call index) whose per-channel spatial sums are read at every position;
    ``full_above``: the fraction of a map above which a layer runs in full instead of on patches;
    ``fold_batchnorm``: fold each eval-mode BatchNorm into the convolution that alone feeds it.
    ``truncate``: Krypton's projective-field threshold τ in (0, 1]: where a window (convolution,
    pooling), a sum or a concatenation would change more than ``⌈τ·H⌉`` rows or ``⌈τ·W⌉``
    columns of its ``H``×``W`` map at a position, only that many, centred on the changed box, are
    computed and the rest is read from the unoccluded image (an approximation; 1: exact).

    Use: ``image = engine.cache(x1)``, ``plan = engine.plan(image, geom)``, then
    ``engine.run(image, plan, painted_input_boxes, positions, channel)`` per batch.
    """

    def __init__(
        self,
        model: nn.Module,
        feature_layer: str | None,
        feature_call: int = 0,
        full_above: float = 0.7,
        fold_batchnorm: bool = True,
        traced: tuple[fx.Graph, list[str]] | None = None,
        truncate: float = 1.0,
    ) -> None:
        if not 0.0 <= full_above <= 1.0:
            raise ConvlensError(f"full_above {full_above!r}: must lie in [0, 1]")
        check_truncate(truncate)
        self.truncate = float(truncate)
        # held weakly: engines are cached per model (``_cache.py``) and must not keep it alive
        self._model_ref = weakref.ref(model)
        self.full_above = float(full_above)
        self.fold_batchnorm = bool(fold_batchnorm)
        self.graph, self.opaque = traced if traced is not None else trace_graph(model)
        self.modules = {k: m for k, m in model.named_modules() if k}
        self.nodes = list(self.graph.nodes)
        self.input_node = next(n for n in self.nodes if n.op == "placeholder")
        self.output_node = next(n for n in self.nodes if n.op == "output")
        self.feature_node: fx.Node | None = None
        self.feature_is_leaf = False  # the node calls the layer's module itself
        if feature_layer:
            if "/" in feature_layer:
                self.feature_node = self._find_function_node(feature_layer, feature_call)
            else:
                self.feature_node = self._find_module_node(feature_layer, feature_call)
        self._dep = self._dependencies()
        self._last_use = self._last_uses()
        self._plan: _Plan | None = None  # the latest plan
        self._plans: OrderedDict[Any, _Plan] = OrderedDict()  # by geometry, the latest last
        self._fold_cache: dict[fx.Node, _Folded] | None = None
        self._checked_inplace = False
        self._opaque = frozenset(self.opaque)
        self._tail_inputs: dict[int, list[fx.Node]] = {}
        self._linears: dict[fx.Node, _Linear | None] = {}
        # shapes of the unoccluded pass's values (None: not a tensor), to check tail splits
        self._shapes: dict[fx.Node, tuple[int, ...] | None] | None = None
        self._truncating: list[fx.Node] = []

    @property
    def model(self) -> nn.Module | None:
        return self._model_ref()

    # -- graph analysis -------------------------------------------------------------------------

    def _find_module_node(self, name: str, call: int) -> fx.Node:
        leaf = [n for n in self.nodes if n.op == "call_module" and n.target == name]
        if leaf:
            if call >= len(leaf):
                raise UnsupportedModel(f"layer {name}:{call}: the graph calls it {len(leaf)} times")
            self.feature_is_leaf = True
            return leaf[call]
        key = name if call == 0 else f"{name}@{call}"
        inside = [n for n in self.nodes if key in (n.meta.get("nn_module_stack") or {})]
        if not inside:
            raise UnsupportedModel(f"layer {name!r}: not found in the traced graph")
        return inside[-1]  # the module's last op; checked against the eager activation later

    def _find_function_node(self, address: str, call: int) -> fx.Node:
        """The node of a functional op named as the recorder names it: ``parent/op`` and its
        call index among the ops of that name directly inside ``parent``."""
        from convlens.engine.capture import TRACED_FUNCTIONS, function_name

        parent, _, op = address.partition("/")
        found = []
        for n in self.nodes:
            if n.op == "call_function":
                name = function_name(n.target)
            elif n.op == "call_method":
                name = str(n.target).strip("_")
            else:
                continue
            if name not in TRACED_FUNCTIONS or name != op:
                continue
            stack = n.meta.get("nn_module_stack") or {}
            owner = next(reversed(stack.values()))[0] if stack else ""
            if owner == parent:
                found.append(n)
        if call >= len(found):
            raise UnsupportedModel(f"layer {address!r}: not found in the traced graph")
        return found[call]

    def _dependencies(self) -> dict[fx.Node, bool]:
        dep: dict[fx.Node, bool] = {}
        for n in self.nodes:
            dep[n] = n.op == "placeholder" or any(dep[a] for a in n.all_input_nodes)
        return dep

    def _last_uses(self) -> dict[int, list[fx.Node]]:
        pos = {n: i for i, n in enumerate(self.nodes)}
        last: dict[fx.Node, int] = {}
        for n in self.nodes:
            for a in n.all_input_nodes:
                last[a] = pos[n]
        out: dict[int, list[fx.Node]] = {}
        for n, i in last.items():
            out.setdefault(i, []).append(n)
        return out

    def _module(self, node: fx.Node) -> nn.Module | None:
        return self.modules.get(node.target) if node.op == "call_module" else None

    # -- the unoccluded pass ----------------------------------------------------------------------

    def _call(self, node: fx.Node, args: tuple, kwargs: dict) -> Any:
        if node.op == "call_module":
            if node.target in self._opaque:
                with _ConvAsLinear():
                    return self.modules[node.target](*args, **kwargs)
            return self.modules[node.target](*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "get_attr":
            obj: Any = self.model
            if obj is None:  # pragma: no cover - the model is gone
                raise UnsupportedModel("the model of this graph no longer exists")
            for part in str(node.target).split("."):
                obj = getattr(obj, part)
            return obj
        raise UnsupportedModel(f"graph node {node.name}: op {node.op!r} not supported")

    def cache(self, x: torch.Tensor) -> ImageCache:
        """Run the graph on one unoccluded image ``[1, C, H, W]`` and keep every node's value.

        Values are kept by reference and copied only before an op that may write into them
        (an in-place op, or an opaque module), so later in-place ops cannot change them."""
        live: dict[fx.Node, Any] = {}
        cached: dict[fx.Node, Any] = {}
        storage: dict[fx.Node, int] = {}
        by_ptr: dict[int, list[fx.Node]] = {}
        opaque = set(self.opaque)
        for n in self.nodes:
            if n.op == "placeholder":
                live[n] = x
            elif n.op == "output":
                live[n] = fx.node.map_arg(n.args[0], lambda a: live[a])
            else:
                args = fx.node.map_arg(n.args, lambda a: live[a])
                kwargs = fx.node.map_arg(n.kwargs, lambda a: live[a])
                writes = []
                if n.op == "call_module" and n.target in opaque:
                    writes = [a for a in n.all_input_nodes if a in storage]
                elif n.args and isinstance(n.args[0], fx.Node) and n.args[0] in storage:
                    if _is_inplace(n, self._module(n)):
                        writes = [n.args[0]]
                for a in writes:  # copy what the op may overwrite before it runs
                    for other in by_ptr.pop(storage[a], []):
                        cached[other] = cached[other].clone()
                lin = None
                if n.op == "call_module" and self._dep[n] and not n.kwargs:
                    lin = self._as_linear(n, self._module(n), lambda a: a, live)
                live[n] = lin(args[0]) if lin is not None else self._call(n, args, kwargs)
            v = live[n]
            cached[n] = v
            if isinstance(v, torch.Tensor) and self._dep[n]:
                ptr = v.untyped_storage().data_ptr()
                storage[n] = ptr
                by_ptr.setdefault(ptr, []).append(n)
        if not self._checked_inplace:
            self._check_inplace(storage)
            self._checked_inplace = True
        self.note_shapes(cached)
        return ImageCache(cached)

    def note_shapes(self, values: dict[fx.Node, Any]) -> None:
        """Remember the shapes of an unoccluded pass's values (which values crossing a tail
        split are batches of rows); an engine planning on another engine's cache (the
        truncated one of ``--approx``) is told them this way."""
        self._shapes = {
            n: tuple(v.shape) if isinstance(v, torch.Tensor) else None for n, v in values.items()
        }

    def _check_inplace(self, storage: dict[fx.Node, int]) -> None:
        """An in-place op is safe here when no other value sharing its input's memory is read
        after it (then every value the graph reads is the value the eager model reads)."""
        pos = {n: i for i, n in enumerate(self.nodes)}
        for n in self.nodes:
            if not self._dep[n] or n.op not in ("call_module", "call_function", "call_method"):
                continue
            if not _is_inplace(n, self._module(n)) or not n.args:
                continue
            first = n.args[0]
            if not isinstance(first, fx.Node) or first not in storage:
                continue
            ptr = storage[first]
            for other in self.nodes[: pos[n]]:
                if storage.get(other) != ptr or not self._dep[other]:
                    continue
                if any(pos[u] > pos[n] for u in other.users):
                    raise UnsupportedModel(
                        f"graph node {_node_label(n)} writes in place into {other.name}, "
                        "which is read again later"
                    )

    # -- planning -------------------------------------------------------------------------------

    def plan(self, image: ImageCache, geom_in: Geom) -> _Plan:
        key = (
            geom_in.h,
            geom_in.w,
            geom_in.H,
            geom_in.W,
            tuple(geom_in.oy.tolist()),
            tuple(geom_in.ox.tolist()),
        )
        if key in self._plans:
            self._plans.move_to_end(key)
            self._plan = self._plans[key]
            return self._plan
        plan = _Plan()
        self._truncating = plan.truncated
        cached = image.values
        kind: dict[fx.Node, Any] = {}
        thr = self.full_above

        def const(a: Any) -> Any:
            return (
                fx.node.map_arg(a, lambda n: cached[n])
                if isinstance(a, (fx.Node, tuple, list, dict))
                else a
            )

        if self._fold_cache is None:  # depends on the weights only: shared by all plans
            self._fold_cache = self._folds(cached, const) if self.fold_batchnorm else {}
        folds = self._fold_cache
        aliases = {f.bn: conv for conv, f in folds.items()}
        plan.folded = len(folds)
        for n in self.nodes:
            if n.op == "placeholder":
                kind[n] = geom_in
                plan.actions[n] = ("input", None)
                plan.geoms[n] = geom_in
                continue
            if n in aliases:  # a BatchNorm folded into the convolution before it
                src = aliases[n]
                plan.actions[n] = ("alias", src)
                kind[n] = kind[src]
                if src in plan.geoms:
                    plan.geoms[n] = plan.geoms[src]
                mode = "patch" if src in plan.geoms else "full"
                g = plan.geoms.get(src)
                plan.report.append(
                    NodeReport(
                        _node_label(n),
                        "folded",
                        mode,
                        g.fraction if g else 1.0,
                        tuple(cached[n].shape),
                    )
                )
                continue
            if n.op == "output":
                plan.actions[n] = ("output", None)
                continue
            if not self._dep[n]:
                kind[n] = "const"
                plan.actions[n] = ("const", None)
                continue
            value = cached[n]
            result_kind = "full" if _contains_tensor(value) else "meta"
            patch_args = [a for a in n.all_input_nodes if isinstance(kind[a], Geom)]
            module = self._module(n)
            action: tuple[str, Any] = ("run", None)
            out_geom: Geom | None = None
            folded = folds.get(n)
            if patch_args:
                action, out_geom = self._plan_patch(n, module, kind, cached, const, thr, folded)
            if action[0] == "run" and folded is not None:
                action = ("run_folded", folded)
            elif action[0] == "run" and (lin := self._as_linear(n, module, const, cached)):
                action = ("run_linear", lin)
            elif action[0] == "run" and not _layout_safe(n, module):
                action = ("run", "contiguous")
            plan.actions[n] = action
            if out_geom is not None:
                kind[n] = out_geom
                plan.geoms[n] = out_geom
            elif action[0] == "meta":
                kind[n] = "meta"
            else:
                kind[n] = result_kind
            if (
                n.op in ("call_module", "call_function", "call_method")
                and isinstance(value, torch.Tensor)
                and value.dim() == 4
            ):
                if out_geom is not None:
                    plan.report.append(
                        NodeReport(
                            _node_label(n),
                            action[0],
                            "patch",
                            out_geom.fraction,
                            tuple(value.shape),
                        )
                    )
                elif action[0] in ("run", "run_folded", "run_linear"):
                    plan.report.append(
                        NodeReport(_node_label(n), action[0], "full", 1.0, tuple(value.shape))
                    )
        plan.truncated[:] = [n for n in plan.truncated if n in plan.geoms]  # not those run full
        self._plan = self._plans[key] = plan
        while len(self._plans) > PLANS_KEPT:
            self._plans.popitem(last=False)
        return plan

    def _as_linear(self, n: fx.Node, module, const, cached) -> _Linear | None:
        """A convolution whose kernel covers its whole unpadded input (vgg16's and AlexNet's
        first fully connected layer, written as a 7x7 convolution) is a matrix product: run as
        one (``F.linear``), it reads the same weights in a GEMM, about twice as fast on CPU for
        a large batch as the convolution kernel. Same values up to float rounding."""
        if n in self._linears:
            return self._linears[n]
        self._linears[n] = None
        p = _conv_params(n, module, const)
        first = n.args[0] if n.args else None
        if p is None or not isinstance(first, fx.Node) or not self._dep[first]:
            return None
        if any(self._dep[a] for a in n.all_input_nodes if a is not first):
            return None
        weight, bias, _, padding, dilation, groups = p
        if not _covers_input(cached.get(first), weight, padding, dilation, groups):
            return None
        self._linears[n] = _Linear(weight.reshape(weight.shape[0], -1), bias)
        return self._linears[n]

    def _folds(self, cached, const) -> dict[fx.Node, _Folded]:
        """Convolutions read only by an eval-mode BatchNorm: fold the norm into the weights
        (one pass over each map instead of two). Not where the probed layer is the convolution
        itself (its value before the norm is needed)."""
        folds: dict[fx.Node, _Folded] = {}
        for bn in self.nodes:
            if not self._dep[bn] or not bn.args or not isinstance(bn.args[0], fx.Node):
                continue
            conv = bn.args[0]
            readers = [u for u in conv.users if not _is_shape_query(u)]
            if conv is self.feature_node or readers != [bn] or not self._dep[conv]:
                continue
            if any(self._dep[a] for a in bn.all_input_nodes if a is not conv):
                continue
            bn_p = _bn_params(bn, self._module(bn), const)
            if bn_p is None:
                continue
            conv_p = _conv_params(conv, self._module(conv), const)
            if conv_p is None or any(
                self._dep[a] for a in conv.all_input_nodes if a is not conv.args[0]
            ):
                continue
            value = cached[conv]
            if not isinstance(value, torch.Tensor) or value.dim() != 4:
                continue
            w, b = _fold(conv_p, bn_p)
            folds[conv] = _Folded(bn, w, b, *conv_p[2:])
        return folds

    def _plan_patch(
        self, n, module, kind, cached, const, thr, folded=None
    ) -> tuple[tuple[str, Any], Any]:
        """The action of a node with at least one patched input."""
        first = n.args[0] if n.args else None
        others = [a for a in n.all_input_nodes if a is not first]
        first_is_patch = isinstance(first, fx.Node) and isinstance(kind.get(first), Geom)
        others_const = all(kind[a] == "const" for a in others)
        value = cached[n]
        if _is_shape_query(n):  # answered from a meta tensor of the full batch shape
            return ("meta", None), None
        union = self._truncated_union if self.truncate < 1.0 else None
        concat = self._plan_cat(n, kind, value, thr, union)
        if concat is not None:
            return concat
        if not (isinstance(value, torch.Tensor) and value.dim() == 4 and first_is_patch):
            return ("run", None), None
        g_in: Geom = kind[first]
        dims = _permute_dims(n)
        if dims is not None and others_const:  # NCHW <-> NHWC (ConvNeXt's blocks)
            to_nhwc, to_nchw = dims == (0, 2, 3, 1), dims == (0, 3, 1, 2)
            if (to_nhwc and not g_in.nhwc) or (to_nchw and g_in.nhwc):
                g = Geom(g_in.h, g_in.w, g_in.oy, g_in.ox, g_in.H, g_in.W, to_nhwc,
                         g_in.box_y, g_in.box_x)  # fmt: skip
                return ("permute", dims), g
            return ("run", None), None
        if g_in.nhwc:  # channels last in the shape: only ops over the channel axis stay per pixel
            if others_const and self._pointwise_nhwc(n, module, const, cached, others, value):
                return ("pointwise", None), g_in
            return ("run", None), None
        base_in = cached[first]
        # convolution and pooling windows
        if others_const and (module is not None or n.op == "call_function"):
            win = _window_of(n, module, const, folded)
            if win is not None:
                H, W = value.shape[-2:]
                if self.truncate < 1.0:
                    (y0, hy), (x0, wx) = g_in.boxes()
                    y0, hy = _axis_box(
                        y0, hy, win.kernel[0], win.stride[0], win.dilation[0], win.pad[0], H
                    )
                    x0, wx = _axis_box(
                        x0, wx, win.kernel[1], win.stride[1], win.dilation[1], win.pad[1], W
                    )
                    g = self._truncated(n, y0, hy, x0, wx, H, W)
                else:
                    oy, h = _axis_out(
                        g_in.oy, g_in.h, win.kernel[0], win.stride[0], win.dilation[0],
                        win.pad[0], H,
                    )  # fmt: skip
                    ox, w = _axis_out(
                        g_in.ox, g_in.w, win.kernel[1], win.stride[1], win.dilation[1],
                        win.pad[1], W,
                    )  # fmt: skip
                    g = Geom(h, w, oy, ox, H, W)
                pads = self._pads(win, base_in.shape[-2:], (H, W))
                if pads is None or g.fraction > thr:
                    return ("run", None), None
                if (
                    win.kernel == (1, 1) and win.stride == (1, 1) and win.pad == (0, 0)
                    and (H, W) == tuple(base_in.shape[-2:])
                ):  # fmt: skip
                    # a 1x1 window changes exactly the box it reads: no halo to gather
                    return ("window_pointwise", win), g_in
                return ("local", (win, pads)), g
        # per-pixel ops
        if others_const and self._pointwise(n, module, const, cached, others):
            return ("pointwise", None), g_in
        # element-wise ops with a constant map of the same size (e.g. ``x - mean_image``, the
        # per-pixel mean subtraction of Section 3): each position reads its own crop of it
        if (
            others_const and len(others) == 1 and self._binary(n)
            and len(n.args) >= 2 and n.args[1] is others[0]
            and _same_size_map(cached[others[0]], value)
        ):  # fmt: skip
            return ("pointwise_map", others[0]), g_in
        # element-wise sums / products of two changed maps
        if self._binary(n) and len(n.all_input_nodes) == 2:
            a, b = n.args[0], n.args[1]
            if (
                isinstance(a, fx.Node) and isinstance(b, fx.Node)
                and isinstance(kind.get(a), Geom) and isinstance(kind.get(b), Geom)
                and cached[a].shape == cached[b].shape == value.shape
            ):  # fmt: skip
                ga, gb = kind[a], kind[b]
                if self.truncate < 1.0:
                    g = self._truncated_union(n, ga, gb)
                else:
                    oy, h = _union_axis(ga.oy, ga.h, gb.oy, gb.h, ga.H)
                    ox, w = _union_axis(ga.ox, ga.w, gb.ox, gb.w, ga.W)
                    g = Geom(h, w, oy, ox, ga.H, ga.W)
                if g.fraction > thr:
                    return ("run", None), None
                return ("union", None), g
        return ("run", None), None

    def _truncated(self, n, y0, hy, x0, wx, H: int, W: int) -> Geom:
        """The geometry of a node whose changed boxes (per position, ``y0``/``hy`` rows and
        ``x0``/``wx`` columns) projective-field truncation caps at ``⌈τ·H⌉`` × ``⌈τ·W⌉``."""
        cap_h, cap_w = truncation_cap(self.truncate, H), truncation_cap(self.truncate, W)
        if bool((hy > cap_h).any() or (wx > cap_w).any()) and n not in self._truncating:
            self._truncating.append(n)
        y0, hy = _truncate_axis(y0, hy, cap_h, H)
        x0, wx = _truncate_axis(x0, wx, cap_w, W)
        oy, h = _common(y0, hy, H)
        ox, w = _common(x0, wx, W)
        return Geom(h, w, oy, ox, H, W, box_y=(y0, hy), box_x=(x0, wx))

    def _truncated_union(self, n, ga: Geom, gb: Geom) -> Geom:
        """The union of two changed boxes per position, truncated (see :meth:`_truncated`)."""
        (ay, ah), (ax, aw) = ga.boxes()
        (by, bh), (bx, bw) = gb.boxes()
        y0, x0 = torch.minimum(ay, by), torch.minimum(ax, bx)
        y1, x1 = torch.maximum(ay + ah, by + bh), torch.maximum(ax + aw, bx + bw)
        return self._truncated(n, y0, y1 - y0, x0, x1 - x0, ga.H, ga.W)

    def _pointwise_nhwc(self, n, module, const, cached, others, value) -> bool:
        """Per pixel on a ``[N, H, W, C]`` map: LayerNorm and ``Linear`` over the last axis,
        activations, dropout at eval, and element-wise ops with per-channel constants."""
        if isinstance(module, nn.Linear) or (n.op == "call_function" and n.target is F.linear):
            return True
        if isinstance(module, nn.LayerNorm) or (
            n.op == "call_function" and n.target is F.layer_norm
        ):
            shape = module.normalized_shape if module is not None else const(n.args[1])
            return tuple(shape) == (value.shape[-1],)
        if module is not None and (
            isinstance(module, nn.BatchNorm2d) or isinstance(module, nn.LocalResponseNorm)
        ):
            return False
        if n.op == "call_function" and n.target in (F.batch_norm, F.local_response_norm):
            return False
        if any(isinstance(cached.get(a), torch.Tensor) and cached[a].dim() > 1 for a in others):
            return False  # only scalars or [C] vectors broadcast over the channel axis
        return self._pointwise(n, module, const, cached, others)

    @staticmethod
    def _plan_cat(n: fx.Node, kind, value, thr, truncated_union=None):
        """``torch.cat`` of changed maps along channels (DenseNet's dense blocks): the output
        changes in the union of the inputs' boxes; each input is re-cut to it."""
        if not (n.op == "call_function" and n.target is torch.cat):
            return None
        if not (isinstance(value, torch.Tensor) and value.dim() == 4):
            return None
        items = n.args[0] if n.args else n.kwargs.get("tensors")
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        if not isinstance(items, (list, tuple)) or not isinstance(dim, int) or dim % 4 != 1:
            return None
        if not all(isinstance(a, fx.Node) and isinstance(kind.get(a), Geom) for a in items):
            return ("run", None), None
        g = kind[items[0]]
        for a in items[1:]:
            h = kind[a]
            if (h.H, h.W) != (g.H, g.W):
                return ("run", None), None
            if truncated_union is not None:
                g = truncated_union(n, g, h)
                continue
            oy, hh = _union_axis(g.oy, g.h, h.oy, h.h, g.H)
            ox, ww = _union_axis(g.ox, g.w, h.ox, h.w, g.W)
            g = Geom(hh, ww, oy, ox, g.H, g.W)
        if g.fraction > thr:
            return ("run", None), None
        return ("cat", tuple(items)), g

    @staticmethod
    def _pads(win: _Window, in_hw, out_hw) -> tuple[int, int, int, int] | None:
        """(top, bottom, left, right) padding that makes ``apply`` with no padding produce the
        full output; None when that is not the op's own semantics (avg pooling past the border
        in ceil mode)."""
        out = []
        for i in range(2):
            need = (out_hw[i] - 1) * win.stride[i] + win.dilation[i] * (win.kernel[i] - 1) + 1
            after = need - win.pad[i] - in_hw[i]
            if win.what == "avg_pool_ceil" and after > win.pad[i]:
                return None
            out.append((win.pad[i], max(after, 0)))
        return (out[0][0], out[0][1], out[1][0], out[1][1])

    def _pointwise(self, n, module, const, cached, others) -> bool:
        if any(_spatial_extent(cached[a]) for a in others):
            return False
        if module is not None:
            t = type(module)
            if t in _POINTWISE_MODULES:
                return True
            if t in _EVAL_POINTWISE_MODULES and not module.training:
                return t is not nn.BatchNorm2d or module.running_mean is not None
            return False
        if n.op == "call_function":
            if n.target in _POINTWISE_FUNCTIONS:
                return True
            if _is_eval_pointwise_function(n, const):
                return True
            return self._binary(n)
        if n.op == "call_method":
            return n.target in _POINTWISE_METHODS or n.target in _BINARY_METHODS
        return False

    @staticmethod
    def _binary(n: fx.Node) -> bool:
        if n.op == "call_function":
            return n.target in _BINARY_FUNCTIONS
        if n.op == "call_method":
            return n.target in _BINARY_METHODS
        return False

    # -- the tail: what runs in full for every position ---------------------------------------

    def tail_start(self, plan: _Plan) -> int | None:
        """Index of the first node of the plan's *tail*: from there on every node runs in full
        (no patch, no input), so positions from different batches, groups of positions and
        images can run through it together in one larger batch (``run(stop=...)`` then
        :meth:`run_tail`). None when no such split is safe: a value crossing the split is not a
        batch-major tensor (a shape read from a batch, a tuple), or there is no tail."""
        if plan.tail is not None:
            return plan.tail if plan.tail >= 0 else None
        last = max(
            i for i, n in enumerate(self.nodes)
            if n in plan.geoms or plan.actions[n][0] == "input"
        )  # fmt: skip
        t = last + 1
        ok = t < len(self.nodes) - 1 and self.tail_ok(plan, t)
        plan.tail = t if ok else -1
        return t if ok else None

    def tail_inputs(self, t: int) -> list[fx.Node]:
        """The input-dependent values computed before node ``t`` and read from ``t`` on."""
        if t not in self._tail_inputs:
            pos = {n: i for i, n in enumerate(self.nodes)}
            self._tail_inputs[t] = [
                n for n in self.nodes[:t]
                if self._dep[n] and any(pos[u] >= t for u in n.users)
            ]  # fmt: skip
        return self._tail_inputs[t]

    def tail_ok(self, plan: _Plan, t: int) -> bool:
        """Whether ``plan`` can stop before node ``t`` and hand its values to :meth:`run_tail`:
        every crossing value is a tensor with one row per position, and every node from ``t``
        on runs in full."""
        for n in self.nodes[t:]:
            if n in plan.geoms or plan.actions[n][0] not in _TAIL_ACTIONS:
                return False
        if self._shapes is None:
            return False
        for n in self.tail_inputs(t):
            shape = self._shapes.get(n)
            if plan.actions[n][0] == "meta" or not shape or shape[0] != 1:
                return False
        return True

    def run_tail(
        self,
        image: ImageCache,
        plan: _Plan,
        t: int,
        state: dict[fx.Node, torch.Tensor],
        feature_channels: torch.Tensor | None,
    ) -> tuple[Any, torch.Tensor | None]:
        """Run nodes ``t`` onwards on ``state`` (the values of :meth:`tail_inputs`, rows of any
        positions and images stacked): logits ``[B, K]`` and, when the probed layer lies in the
        tail, the spatial sum of each row's channel (``feature_channels[b]``), float64 ``[B]``.
        ``image`` supplies the input-independent values (weights, constants): any image's."""
        cached = image.values
        vals: dict[fx.Node, Any] = dict(state)
        feature: torch.Tensor | None = None
        for i in range(t, len(self.nodes)):
            n = self.nodes[i]
            action, extra = plan.actions[n]

            def get(a: fx.Node, contiguous=extra == "contiguous") -> Any:
                v = vals[a] if a in vals else cached[a]  # input-independent values: cached
                if contiguous and isinstance(v, torch.Tensor) and v.dim() == 4:
                    return v.contiguous()
                return v

            if action == "const":
                vals[n] = cached[n]
            elif action == "output":
                return fx.node.map_arg(n.args[0], get), feature
            elif action in ("run", "meta"):
                args = fx.node.map_arg(n.args, get)
                kwargs = fx.node.map_arg(n.kwargs, get)
                vals[n] = self._call(n, args, kwargs)
            elif action in ("run_folded", "run_linear"):
                vals[n] = extra(get(n.args[0]))
            elif action == "alias":
                vals[n] = get(extra)
            else:  # pragma: no cover - tail_ok admits only the actions above
                raise AssertionError(action)
            if n is self.feature_node and feature_channels is not None:
                v = vals[n]
                rows = torch.arange(v.shape[0], device=v.device)
                feature = v[rows, feature_channels.to(v.device)].double().sum((1, 2))
            for dead in self._last_use.get(i, ()):
                vals.pop(dead, None)
        raise AssertionError("graph without output")  # pragma: no cover

    # -- execution ------------------------------------------------------------------------------

    def run(
        self,
        image: ImageCache,
        plan: _Plan,
        input_patch: torch.Tensor,
        chunk: slice,
        feature_channel: int | None,
        stop: int | None = None,
    ) -> tuple[Any, torch.Tensor | None]:
        """Logits ``[B, K]`` and the probed channel's spatial sums ``[B]`` (float64) for the
        positions ``chunk`` of the plan; ``input_patch`` is the painted input box of each.
        With ``stop`` (a :meth:`tail_start` valid for this plan), the run ends before that node
        and returns the values :meth:`run_tail` continues from instead of the logits (and the
        sums when the probed layer comes before ``stop``, else None)."""
        cached = image.values
        pads_memo = image.pads
        vals: dict[fx.Node, Any] = {}
        full_memo: dict[fx.Node, torch.Tensor] = {}
        batch = input_patch.shape[0]
        feature: torch.Tensor | None = None

        def full(a: fx.Node) -> Any:
            v = vals[a]
            if isinstance(v, _Patch):
                if a not in full_memo:
                    full_memo[a] = _materialize(v)
                return full_memo[a]
            return v

        def full_contiguous(a: fx.Node) -> Any:
            v = full(a)
            if isinstance(v, torch.Tensor) and v.dim() == 4 and not v.is_contiguous():
                return v.contiguous()
            return v

        def meta(a: fx.Node) -> Any:
            v = vals[a]
            if isinstance(v, _Patch):
                return torch.empty((batch, *v.base.shape[1:]), dtype=v.base.dtype, device="meta")
            return v

        def shape_query(n: fx.Node) -> Any:
            if n.op == "call_function" and n.args[1] != "shape":  # dtype, device, ndim, ...
                v = vals[n.args[0]]
                return getattr(v.base if isinstance(v, _Patch) else v, n.args[1])
            args = fx.node.map_arg(n.args, meta)
            kwargs = fx.node.map_arg(n.kwargs, meta)
            return self._call(n, args, kwargs)

        for i, n in enumerate(self.nodes):
            if i == stop:
                return {a: full(a) for a in self.tail_inputs(stop)}, feature
            action, extra = plan.actions[n]
            if action == "const":
                vals[n] = cached[n]
            elif action == "input":
                g = plan.geoms[n]
                vals[n] = _Patch(input_patch, g.oy[chunk], g.ox[chunk], cached[n])
            elif action == "output":
                out = fx.node.map_arg(n.args[0], full)
                return out, feature
            elif action == "run":
                get = full if extra is None else full_contiguous
                args = fx.node.map_arg(n.args, get)
                kwargs = fx.node.map_arg(n.kwargs, get)
                vals[n] = self._call(n, args, kwargs)
            elif action == "meta":
                vals[n] = shape_query(n)
            elif action in ("run_folded", "run_linear"):
                vals[n] = extra(full(n.args[0]))
            elif action == "alias":
                v = vals[extra]
                vals[n] = _Patch(v.data, v.oy, v.ox, cached[n]) if isinstance(v, _Patch) else v
            elif action == "local":
                win, pads = extra
                src: _Patch = vals[n.args[0]]
                g = plan.geoms[n]
                key = (n.args[0], pads, win.pad_value)
                if key not in pads_memo:
                    pads_memo[key] = _Source(src.base, pads, win.pad_value)
                oy, ox = g.oy[chunk], g.ox[chunk]
                hw = (g.h - 1) * win.stride[0] + win.dilation[0] * (win.kernel[0] - 1) + 1
                ww = (g.w - 1) * win.stride[1] + win.dilation[1] * (win.kernel[1] - 1) + 1
                window = _gather(
                    pads_memo[key],
                    src,
                    pads[0],
                    pads[2],
                    oy * win.stride[0],
                    ox * win.stride[1],
                    hw,
                    ww,
                )
                vals[n] = _Patch(win.apply(window), oy, ox, cached[n])
            elif action == "window_pointwise":
                src = vals[n.args[0]]
                vals[n] = _Patch(extra.apply(src.data), src.oy, src.ox, cached[n])
            elif action == "pointwise":
                first = n.args[0]
                src = vals[first]

                def same_or_full(a: fx.Node, first=first, src=src) -> Any:
                    return src.data if a is first else full(a)

                args = (src.data,) + tuple(fx.node.map_arg(n.args[1:], same_or_full))
                kwargs = fx.node.map_arg(n.kwargs, same_or_full)
                vals[n] = _Patch(self._call(n, args, kwargs), src.oy, src.ox, cached[n], src.nhwc)
            elif action == "permute":
                src = vals[n.args[0]]
                vals[n] = _Patch(src.data.permute(*extra), src.oy, src.ox, cached[n], not src.nhwc)
            elif action == "pointwise_map":
                src = vals[n.args[0]]
                crop = _crop(cached[extra], src.oy, src.ox, *src.data.shape[-2:])
                args = (src.data, crop, *fx.node.map_arg(n.args[2:], full))
                kwargs = fx.node.map_arg(n.kwargs, full)
                vals[n] = _Patch(self._call(n, args, kwargs), src.oy, src.ox, cached[n])
            elif action == "cat":
                g = plan.geoms[n]
                oy, ox = g.oy[chunk], g.ox[chunk]
                parts = [_align(vals[a], g, oy, ox, pads_memo, a) for a in extra]
                vals[n] = _Patch(torch.cat(parts, 1), oy, ox, cached[n])
            elif action == "union":
                g = plan.geoms[n]
                oy, ox = g.oy[chunk], g.ox[chunk]
                a = _align(vals[n.args[0]], g, oy, ox, pads_memo, n.args[0])
                b = _align(vals[n.args[1]], g, oy, ox, pads_memo, n.args[1])
                vals[n] = _Patch(self._call(n, (a, b), dict(n.kwargs)), oy, ox, cached[n])
            else:  # pragma: no cover - plan and executor disagree
                raise AssertionError(action)
            if n is self.feature_node and feature_channel is not None:
                feature = _channel_sums(vals[n], feature_channel, image)
            for dead in self._last_use.get(i, ()):
                vals.pop(dead, None)
                full_memo.pop(dead, None)
        raise AssertionError("graph without output")  # pragma: no cover


_LAYOUT_SAFE_MODULES = (
    nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
    nn.BatchNorm2d, nn.Linear, nn.Flatten,
) + _POINTWISE_MODULES + _EVAL_POINTWISE_MODULES  # fmt: skip
_LAYOUT_SAFE_FUNCTIONS = _POINTWISE_FUNCTIONS | _BINARY_FUNCTIONS | {
    F.conv2d, torch.conv2d, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d, F.batch_norm, F.dropout, F.dropout2d, torch.flatten, torch.cat,
    torch.mean, torch.sum, getattr, operator.getitem, operator.eq, torch._assert, F.linear,
}  # fmt: skip
_LAYOUT_SAFE_METHODS = _POINTWISE_METHODS | _BINARY_METHODS | {
    "mean", "sum", "amax", "flatten", "reshape", "size", "dim", "float", "contiguous",
}  # fmt: skip


def _layout_safe(n: fx.Node, module: nn.Module | None) -> bool:
    """Ops that accept channels-last maps as they are (others get contiguous copies, so that
    e.g. ``x.view(n, -1)`` keeps working)."""
    if n.op == "call_module":
        return type(module) in _LAYOUT_SAFE_MODULES
    if n.op == "call_function":
        try:
            return n.target in _LAYOUT_SAFE_FUNCTIONS
        except TypeError:  # unhashable target
            return False
    if n.op == "call_method":
        return n.target in _LAYOUT_SAFE_METHODS
    return True


def _permute_dims(n: fx.Node) -> tuple[int, ...] | None:
    """The dims of ``x.permute(...)`` / ``torch.permute(x, dims)`` when given as numbers."""
    if n.op == "call_method" and n.target == "permute":
        dims = n.args[1] if len(n.args) == 2 else n.args[1:]
    elif n.op == "call_function" and n.target is torch.permute:
        dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dims")
    else:
        return None
    if not isinstance(dims, (tuple, list)) or not all(isinstance(d, int) for d in dims):
        return None
    return tuple(d % 4 for d in dims)


def _is_shape_query(n: fx.Node) -> bool:
    """``x.shape``, ``x.ndim``, ``x.size()``…: reads no values."""
    if n.op == "call_function" and n.target is getattr:
        return len(n.args) > 1 and n.args[1] in _SHAPE_ATTRS
    return n.op == "call_method" and n.target in _SHAPE_METHODS


def _spatial_extent(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and v.dim() >= 2 and (v.shape[-1] > 1 or v.shape[-2] > 1)


def _same_size_map(c: Any, value: torch.Tensor) -> bool:
    """A constant ``[C, H, W]`` or ``[1, C, H, W]`` map (C may be 1) with the op's spatial size,
    so that the op stays per pixel."""
    return (
        isinstance(c, torch.Tensor)
        and c.dim() in (3, 4)
        and (c.dim() == 3 or c.shape[0] == 1)
        and tuple(c.shape[-2:]) == tuple(value.shape[-2:])
        and c.shape[-3] in (1, value.shape[1])
    )


def _crop(c: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Per position, the ``h``×``w`` box at ``(oy, ox)`` of the constant map ``c``:
    ``[B, C, h, w]``."""
    c3 = c.reshape(c.shape[-3:])
    ys = oy[:, None] + torch.arange(h, device=oy.device)  # [B, h]
    xs = ox[:, None] + torch.arange(w, device=ox.device)  # [B, w]
    out = c3[:, ys[:, :, None], xs[:, None, :]]  # [C, B, h, w]
    return out.permute(1, 0, 2, 3)


class _Source:
    """The cached map padded (top, bottom, left, right) with ``value``, as channels-last rows
    ``[Hp * Wp, C]``, followed by room for one batch's patch rows: windows are gathered from it
    with one index per output pixel, and the padded map is copied once per image, not per batch."""

    def __init__(self, base: torch.Tensor, pads, value: float) -> None:
        top, bottom, left, right = pads
        x = F.pad(base, (left, right, top, bottom), value=value) if any(pads) else base
        self.hp, self.wp = int(x.shape[-2]), int(x.shape[-1])
        self.n = self.hp * self.wp
        self.buf = x[0].permute(1, 2, 0).reshape(self.n, x.shape[1]).contiguous()

    def with_rows(self, rows: torch.Tensor) -> torch.Tensor:
        need = self.n + rows.shape[0]
        if self.buf.shape[0] < need:
            grown = self.buf.new_empty((need, self.buf.shape[1]))
            grown[: self.n] = self.buf[: self.n]
            self.buf = grown
        self.buf[self.n : need] = rows
        return self.buf[:need]


def _gather(source: _Source, src: _Patch, top, left, wy0, wx0, hw, ww) -> torch.Tensor:
    """Per position, the ``hw``×``ww`` window at ``(wy0, wx0)`` (padded coordinates) of the
    position's map: the cached map with its patch pasted in. ``[B, C, hw, ww]`` (channels-last
    memory)."""
    data = src.data
    b, c, h, w = data.shape
    dev = data.device
    hp, wp = source.hp, source.wp
    ys = wy0[:, None] + torch.arange(hw, device=dev)  # [B, hw], padded coordinates
    xs = wx0[:, None] + torch.arange(ww, device=dev)
    py = ys - top - src.oy[:, None]
    px = xs - left - src.ox[:, None]
    in_y = (py >= 0) & (py < h)
    in_x = (px >= 0) & (px < w)
    base_idx = ys[:, :, None] * wp + xs[:, None, :]
    offset = hp * wp + torch.arange(b, device=dev)[:, None, None] * (h * w)
    patch_idx = offset + py.clamp(0, h - 1)[:, :, None] * w + px.clamp(0, w - 1)[:, None, :]
    idx = torch.where(in_y[:, :, None] & in_x[:, None, :], patch_idx, base_idx)
    rows = data.permute(0, 2, 3, 1).reshape(b * h * w, c)
    out = source.with_rows(rows).index_select(0, idx.reshape(-1))
    return out.view(b, hw, ww, c).permute(0, 3, 1, 2)


def _align(v: Any, g: Geom, oy, ox, pads_memo, node) -> torch.Tensor:
    """A patch re-cut to another (containing) box."""
    if isinstance(v, _Patch):
        if v.data.shape[-2:] == (g.h, g.w) and torch.equal(v.oy, oy) and torch.equal(v.ox, ox):
            return v.data
        key = (node, (0, 0, 0, 0), 0.0)
        if key not in pads_memo:
            pads_memo[key] = _Source(v.base, (0, 0, 0, 0), 0.0)
        return _gather(pads_memo[key], v, 0, 0, oy, ox, g.h, g.w)
    raise AssertionError("union of a non-patch value")  # pragma: no cover


def _materialize(v: _Patch) -> torch.Tensor:
    """The full maps ``[B, C, H, W]`` (channels-last memory): the cached map with each
    position's patch written in (``[B, H, W, C]`` for a channels-last-shaped map)."""
    if v.nhwc:
        b, h, w, c = v.data.shape
        _, H, W, _ = v.base.shape
        out = v.base.new_empty((b, H, W, c))
        out.copy_(v.base.expand(b, H, W, c))  # a copy even for one position: never the cache
        dev = v.data.device
        ys = v.oy[:, None] + torch.arange(h, device=dev)
        xs = v.ox[:, None] + torch.arange(w, device=dev)
        idx = (ys[:, :, None] * W + xs[:, None, :]).reshape(b, h * w, 1).expand(b, h * w, c)
        out.view(b, H * W, c).scatter_(1, idx, v.data.reshape(b, h * w, c))
        return out
    data = v.data
    b, c, h, w = data.shape
    _, _, H, W = v.base.shape
    # always a copy: ``contiguous`` would return the cached map itself for one position of a
    # map already in channels-last memory, and the scatter below would overwrite the cache
    out = torch.empty((b, c, H, W), dtype=v.base.dtype, device=v.base.device,
                      memory_format=torch.channels_last)  # fmt: skip
    out.copy_(v.base.expand(b, c, H, W))
    dev = data.device
    ys = v.oy[:, None] + torch.arange(h, device=dev)
    xs = v.ox[:, None] + torch.arange(w, device=dev)
    idx = (ys[:, :, None] * W + xs[:, None, :]).reshape(b, h * w, 1).expand(b, h * w, c)
    rows = data.permute(0, 2, 3, 1).reshape(b, h * w, c)
    out.permute(0, 2, 3, 1).view(b, H * W, c).scatter_(1, idx, rows)
    return out


def _channel_sums(v: Any, channel: int, image: ImageCache) -> torch.Tensor:
    """Spatial sum of one channel at every position, float64 ``[B]``."""
    if isinstance(v, _Patch) and v.nhwc:
        v = _materialize(v)
    if isinstance(v, _Patch):
        key = (id(v.base), channel)
        if key not in image.integrals:
            base = v.base[0, channel].double()
            s = torch.zeros(
                base.shape[0] + 1, base.shape[1] + 1, dtype=torch.float64, device=base.device
            )
            s[1:, 1:] = base.cumsum(0).cumsum(1)
            image.integrals[key] = s
        s = image.integrals[key]
        h, w = v.data.shape[-2:]
        y0, x0, y1, x1 = v.oy, v.ox, v.oy + h, v.ox + w
        inside = s[y1, x1] - s[y0, x1] - s[y1, x0] + s[y0, x0]
        return s[-1, -1] - inside + v.data[:, channel].double().sum((1, 2))
    return v[:, channel].double().sum((1, 2))
