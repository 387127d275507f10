"""The deconvnet of Section 2.1 as a *modified backward pass*, for any convnet, and the two
backward rules people compare it with.

**Backward rules** (``rule``; they differ only at rectifier-family ops, see :data:`RULES`):

* ``deconvnet`` (Zeiler & Fergus, Section 2.1): the rectifier's backward *rectifies the signal*,
  ``relu(grad_out)``, whatever the forward input was. Below a layer with no max pooling under it
  this sees nothing of the image (Mahendran & Vedaldi, "Salient deconvolutional networks", ECCV
  2016): every image gives the same projection of a unit.
* ``guided`` (Springenberg et al., "Striving for simplicity", 2015, guided backpropagation):
  rectify the signal *and* gate it by the forward op's local slope, clipped at zero:
  ``relu(grad_out) * max(f'(x), 0)``. For ``relu`` that is the mask ``x > 0``; for ``relu6`` /
  ``hardtanh(min, max)`` the mask ``min < x < max`` (zero where the op saturated); ``leaky_relu``
  / ``prelu`` / ``rrelu`` (eval) keep their negative slope (``1`` for ``x > 0``, the slope for
  ``x < 0``); ``elu``/``selu``/``celu`` their positive derivative; smooth ones (``silu``,
  ``gelu``, ``mish``, ``softplus``, ``hardswish``) their derivative where it is positive (zero
  where it is negative, e.g. SiLU below x ≈ −1.28). On nets of ``nn.ReLU`` this is exactly
  Captum's ``GuidedBackprop``.
* ``gradient``: plain autograd (the rectifier keeps its own backward; contrast normalisation is
  back-propagated: the ``mode`` is ``captum``).

The rest of this docstring describes what all three rules share.

Zeiler & Fergus (Section 2.1, Fig. 1) walk a chain network backwards: unpool with the switches,
rectify, filter with the transposed filters. On a graph that is not a chain (residual additions,
concatenations, depthwise convolutions, BatchNorm, ReLU6/SiLU) the same rules are applied to
autograd's backward pass:

* **ReLU family** (``relu``, ``relu6``, ``hardtanh``, ``leaky_relu``, ``elu``, ``selu``,
  ``celu``, ``gelu``, ``silu``, ``mish``, ``hardswish``, ``softplus``, ``prelu``, ``rrelu``; as
  ``nn`` modules, ``F.*`` functions or tensor methods, in place or not): the backward of the op is
  replaced by *rectifying the incoming signal*, ``relu(grad_out)``, independent of the forward
  input — the deconvnet's "rectification". Ops are seen through a ``TorchFunctionMode`` (the
  engine's approach, :mod:`convlens.engine.capture`), so functional calls are rectified too.
* **max pooling** (module or functional, adaptive too): autograd's own backward, which routes the
  signal to the recorded argmax (the switches) and *adds* where overlapping windows chose the same
  input position.
* **linear ops** (convolutions of any stride/padding/dilation/groups, linear layers, average
  pooling, additions, concatenations, reshapes, padding, interpolation): autograd's backward is
  their transpose; biases never enter a backward pass.
* **BatchNorm** in eval mode is a per-channel affine map; its backward multiplies by
  ``gamma / sqrt(running_var + eps)`` (the transpose of the folded convolution) — exactly
  autograd's, computed as one multiplication (cheaper than ``native_batch_norm_backward``).
* **contrast normalisation** (``local_response_norm``): ``mode="paper"`` skips it (the backward
  passes the signal through unchanged, as the paper's deconvnet does); ``mode="captum"`` uses its
  true gradient. ``layer_norm``/``group_norm``/``instance_norm``: ``"paper"`` treats their
  statistics as constants (backward = ``grad * weight / sigma``), ``"captum"`` the true gradient.
* everything else (``sigmoid``/``tanh`` gates, softmax, multiplications) keeps its ordinary
  gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from convlens.engine.capture import function_name

__all__ = ["DeconvMode", "RECTIFIERS", "MODES", "RULES", "local_slope", "module_slope"]

#: Normalised op names whose backward becomes ``relu(grad_out)``.
RECTIFIERS = frozenset(
    "relu relu6 hardtanh leaky_relu elu selu celu gelu silu mish hardswish softplus prelu "
    "rrelu".split()
)
_FROZEN_NORMS = frozenset({"layer_norm", "group_norm", "instance_norm"})
#: ``paper``: skip contrast normalisation (Section 2.1); ``captum``: back-propagate through it.
MODES = ("paper", "captum")
#: The backward rules at rectifier-family ops (module docstring).
RULES = ("deconvnet", "guided", "gradient")


def local_slope(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``f'(x)`` of an element-wise op ``fn`` (its own autograd backward at ``x``; ``fn`` may run
    in place: it gets a copy). Used by the ``guided`` rule."""
    with torch.enable_grad():
        t = x.detach().clone().requires_grad_(True)
        y = fn(t * 1.0)  # a non-leaf copy: in-place ops are allowed on it
        (g,) = torch.autograd.grad(y, t, torch.ones_like(y))
    return g.detach()


def _run(ctx, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Run the original op inside a custom Function's forward, in place if it was."""
    out = fn(x)
    if out.data_ptr() == x.data_ptr() and out.shape == x.shape:  # the op ran in place
        ctx.mark_dirty(x)
        return x
    return out


class _Rectify(torch.autograd.Function):
    """Forward: the original op (in place if it was). Backward: ``relu(grad_out)``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]):
        return _run(ctx, x, fn)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.clamp(min=0), None


def _band(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """The slope of a piecewise-linear rectifier: 1 on ``(lo, hi)``, 0 outside (the values of
    its autograd backward: ReLU ``(0, inf)``, ReLU6 ``(0, 6)``, hardtanh ``(min, max)``)."""
    return ((x > lo) & (x < hi)).to(x.dtype)


def module_slope(m, x: torch.Tensor) -> torch.Tensor:
    """``f'(x)`` of a rectifier module (closed forms for ReLU, ReLU6/Hardtanh, LeakyReLU; the
    module's own autograd derivative otherwise). The chain form's guided/gradient rules use it."""
    from torch import nn

    if isinstance(m, nn.ReLU):
        return _band(x, 0.0, float("inf"))
    if isinstance(m, nn.Hardtanh):  # nn.ReLU6 is a Hardtanh(0, 6)
        return _band(x, m.min_val, m.max_val)
    if isinstance(m, nn.LeakyReLU):
        return torch.where(x > 0, torch.ones_like(x), torch.full_like(x, m.negative_slope))
    return local_slope(m, x)


def _gate(name: str, x: torch.Tensor, rest: tuple, kw: dict, fn) -> torch.Tensor:
    """``max(f'(x), 0)`` of a functional rectifier call (its arguments ``rest``/``kw``): the
    closed forms of :func:`_band` where they apply, :func:`local_slope` for the others."""
    if name == "relu":
        return _band(x, 0.0, float("inf"))
    if name == "relu6":
        return _band(x, 0.0, 6.0)
    if name == "hardtanh":
        return _band(x, _arg(rest, kw, 0, "min_val", -1.0), _arg(rest, kw, 1, "max_val", 1.0))
    return local_slope(fn, x).clamp_(min=0)


class _Guided(torch.autograd.Function):
    """Forward: the original op (in place if it was). Backward: ``relu(grad_out) * max(f'(x), 0)``
    with ``f'`` the op's slope at the forward input (taken before an in-place op overwrote it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], gate_fn):
        gate = gate_fn(x)
        ctx.save_for_backward(gate)
        return _run(ctx, x, fn)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (gate,) = ctx.saved_tensors
        return grad.clamp(min=0) * gate.to(grad.dtype), None, None


class _PassThrough(torch.autograd.Function):
    """Forward: the original op. Backward: the signal unchanged (a skipped layer)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]):
        return _run(ctx, x, fn)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _Scaled(torch.autograd.Function):
    """Forward: the original op. Backward: ``grad * gain`` (a normalisation with frozen
    statistics: ``gain = weight / sigma`` broadcast to the input's shape)."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], gain: torch.Tensor
    ):
        ctx.save_for_backward(gain)
        return fn(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (gain,) = ctx.saved_tensors
        return grad * gain.to(grad.dtype), None, None


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _frozen_gain(name: str, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """``weight / sigma`` of a normalisation, broadcastable to ``x``; None when not applicable."""
    if name == "batch_norm":  # eval mode only: the running statistics are constants
        running_var = _arg(args, kwargs, 2, "running_var")
        weight = _arg(args, kwargs, 3, "weight")
        training = _arg(args, kwargs, 5, "training", False)
        eps = _arg(args, kwargs, 7, "eps", 1e-5)
        if training or running_var is None or x.dim() < 2:
            return None
        gain = torch.rsqrt(running_var.detach().float() + eps)
        if weight is not None:
            gain = gain * weight.detach().float()
        return gain.reshape(1, -1, *([1] * (x.dim() - 2)))
    xd = x.detach().float()
    if name == "layer_norm":
        shape = _arg(args, kwargs, 1, "normalized_shape")
        weight = _arg(args, kwargs, 2, "weight")
        eps = _arg(args, kwargs, 4, "eps", 1e-5)
        dims = tuple(range(x.dim() - len(tuple(shape)), x.dim()))
        sigma = (xd.var(dim=dims, unbiased=False, keepdim=True) + eps).sqrt()
        gain = 1.0 / sigma
        if weight is not None:
            gain = gain * weight.detach().float()
        return gain.expand_as(xd).to(x.dtype)
    if name == "group_norm":
        groups = int(_arg(args, kwargs, 1, "num_groups"))
        weight = _arg(args, kwargs, 2, "weight")
        eps = _arg(args, kwargs, 4, "eps", 1e-5)
        n, c = x.shape[:2]
        sigma = (xd.reshape(n, groups, -1).var(-1, unbiased=False) + eps).sqrt()
        gain = (1.0 / sigma).repeat_interleave(c // groups, dim=1)
        gain = gain.reshape(n, c, *([1] * (x.dim() - 2)))
        if weight is not None:
            gain = gain * weight.detach().float().reshape(1, c, *([1] * (x.dim() - 2)))
        return gain.expand_as(xd).to(x.dtype)
    if name == "instance_norm":
        weight = _arg(args, kwargs, 3, "weight")
        eps = _arg(args, kwargs, 7, "eps", 1e-5)
        dims = tuple(range(2, x.dim()))
        sigma = (xd.var(dim=dims, unbiased=False, keepdim=True) + eps).sqrt()
        gain = 1.0 / sigma
        if weight is not None:
            gain = gain * weight.detach().float().reshape(1, -1, *([1] * (x.dim() - 2)))
        return gain.expand_as(xd).to(x.dtype)
    return None


class DeconvMode(TorchFunctionMode):
    """Inside this mode, a forward pass builds an autograd graph whose backward is the deconvnet
    (see the module docstring). ``seen`` counts the ops it modified, by name — a probe records
    them (e.g. ``{"hardtanh": 33}`` for efficientnet_lite0's ReLU6)."""

    def __init__(self, mode: str = "paper", rule: str = "deconvnet") -> None:
        super().__init__()
        from convlens.errors import ConvlensError

        if mode not in MODES:
            raise ConvlensError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
        if rule not in RULES:
            raise ConvlensError(f"rule {rule!r}: expected one of {', '.join(RULES)}")
        self.rule = rule
        self.mode = "captum" if rule == "gradient" else mode
        self.seen: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        name = function_name(func)
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, torch.Tensor) or not torch.is_grad_enabled():
            return func(*args, **kwargs)
        rest = args[1:]
        kw = {k: v for k, v in kwargs.items() if k != "input"}
        if name in RECTIFIERS:
            self.seen[name] = self.seen.get(name, 0) + 1
            if self.rule == "gradient":
                return func(*args, **kwargs)
            op = lambda t: func(t, *rest, **kw)  # noqa: E731
            if self.rule == "guided":
                return _Guided.apply(x, op, lambda t: _gate(name, t, rest, kw, op))
            return _Rectify.apply(x, op)
        if name == "local_response_norm" and self.mode == "paper":
            self.seen[name] = self.seen.get(name, 0) + 1
            return _PassThrough.apply(x, lambda t: func(t, *rest, **kw))
        if name == "batch_norm" or (name in _FROZEN_NORMS and self.mode == "paper"):
            gain = _frozen_gain(name, x, args, kwargs)
            if gain is not None:
                self.seen[name] = self.seen.get(name, 0) + 1
                return _Scaled.apply(x, lambda t: func(t, *rest, **kw), gain)
        return func(*args, **kwargs)
