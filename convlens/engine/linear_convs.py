"""A 2-d convolution whose kernel covers its whole unpadded input is a matrix product: run it as
one.

VGG's fully connected layers in timm are such convolutions (``ConvMlp``: a 7x7 kernel on a 7x7
map, then 1x1 kernels on a 1x1 map). As convolutions, oneDNN reorders their weights into its
blocked layout on every call: on vgg16 that is 0.22 s of a 0.24 s head for one image (410 MB of
weights rewritten), against 0.02 s as ``F.linear`` (same products, summed in another order:
float32 rounding apart). One mechanism, two users: the engine's inference passes
(:func:`~convlens.engine.trace_model`, :func:`~convlens.engine.traced_pass`) run under
:class:`ConvAsLinear`, and the occlusion executor uses :func:`covers_input` and
:class:`LinearConv` for its traced nodes and opaque modules.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["covers_input", "LinearConv", "ConvAsLinear"]

_CONV2D_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV2D_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(a) for a in v)
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


def covers_input(x: Any, weight: Any, padding: Any, dilation: Any, groups: int) -> bool:
    """Whether a 2-d convolution of ``x`` with ``weight`` is a matrix product: its kernel covers
    the whole unpadded input (no dilation, one group), so its output is 1x1."""
    if not (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor)):
        return False
    if isinstance(padding, str):
        if padding != "valid":
            return False
        padding = 0
    return (
        x.dim() == 4 and weight.dim() == 4 and groups == 1 and _pair(dilation) == (1, 1)
        and _pair(padding) == (0, 0) and tuple(weight.shape[-2:]) == tuple(x.shape[-2:])
    )  # fmt: skip


class LinearConv:
    """A convolution whose kernel covers its input, as a matrix product: ``[N, C, k, k]`` in,
    ``[N, O, 1, 1]`` out. ``weight``: the convolution's weight flattened to ``[O, C*k*k]``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight, self.bias = weight, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x.reshape(x.shape[0], -1), self.weight, self.bias)
        return out.view(x.shape[0], -1, 1, 1)


class ConvAsLinear(TorchFunctionMode):
    """Inside this mode, every ``torch.conv2d`` call whose kernel covers its whole unpadded input
    runs as :class:`LinearConv`; any other call runs unchanged. Module hooks still see the
    convolution module's call and its ``[N, O, 1, 1]`` output.

    Enter it *outside* a recording function mode (``record(functional=True)``): modes entered
    later see a call first, so the recorder still sees ``conv2d``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.conv2d or func is F.conv2d:
            b = dict(_CONV2D_DEFAULTS)
            b.update(zip(_CONV2D_ARGS, args, strict=False))
            b.update(kwargs)
            x, w = b["input"], b["weight"]
            if covers_input(x, w, b["padding"], b["dilation"], b["groups"]):
                return LinearConv(w.reshape(w.shape[0], -1), b["bias"])(x)
        return func(*args, **kwargs)
