"""Analytic receptive fields, propagated op by op through any convnet.

Every tensor that flows through a recorded forward pass carries a :class:`ReceptiveField`: for the
unit at output position ``(y, x)`` the input pixels that can influence it are the box

    rows ``start_h + y * stride_h`` … ``start_h + y * stride_h + size_h - 1`` (likewise columns).

The input image starts as size 1, stride 1, start 0. A convolution or pooling with kernel ``k``,
stride ``s``, padding ``p`` and dilation ``d`` maps ``(size, stride, start)`` to
``(size + (d·(k−1))·stride, stride·s, start − p·stride)``. Element-wise ops that combine several
tensors (residual ``add``, ``cat``, ``mul``) take the union of their inputs' fields; a 1×1 gate
broadcast onto a larger map (squeeze-and-excitation) is left out of that union so that the local
field stays meaningful. Ops that remove the spatial layout (flatten, linear, global pooling) give a
*global* field: the whole input. Boxes are reported unclipped (they may reach outside the image, as
padding does); :meth:`ReceptiveField.box` clips on request.

This is the analysis behind the patch crops of Fig. 2 (Zeiler & Fergus, Section 4): an image patch
shown beside a projection is the receptive field of the projected unit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["ReceptiveField", "conv_like", "union", "padded"]


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(a) for a in v)
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


@dataclass(frozen=True)
class ReceptiveField:
    """Receptive field of one layer's units, in input pixels (per axis: height, width).

    ``size``: extent of one unit's field; ``stride``: input pixels between adjacent units
    (the "jump"); ``start``: coordinate of the first pixel of unit (0, 0)'s field (negative when
    padding reaches outside the image). ``is_global``: the unit sees the whole input
    (after flatten, linear or global pooling); then ``size`` is the input size.
    """

    size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    start: tuple[int, int] = (0, 0)
    is_global: bool = False

    @classmethod
    def identity(cls) -> ReceptiveField:
        return cls()

    @classmethod
    def whole(cls, input_hw: tuple[int, int]) -> ReceptiveField:
        return cls(size=tuple(input_hw), stride=(0, 0), start=(0, 0), is_global=True)

    @property
    def center_offset(self) -> tuple[float, float]:
        """Centre of unit (0, 0)'s field, in input pixels."""
        return (
            self.start[0] + (self.size[0] - 1) / 2.0,
            self.start[1] + (self.size[1] - 1) / 2.0,
        )

    def box(
        self, y: int, x: int, clip_to: tuple[int, int] | None = None
    ) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` (exclusive ends) of unit ``(y, x)``'s field, optionally clipped
        to an image of height/width ``clip_to``."""
        if self.is_global:
            h, w = clip_to or self.size
            return (0, 0, int(w), int(h))
        y0 = self.start[0] + y * self.stride[0]
        x0 = self.start[1] + x * self.stride[1]
        y1, x1 = y0 + self.size[0], x0 + self.size[1]
        if clip_to is not None:
            h, w = clip_to
            y0, x0 = max(0, y0), max(0, x0)
            y1, x1 = min(int(h), y1), min(int(w), x1)
        return (int(x0), int(y0), int(x1), int(y1))

    def to_dict(self) -> dict:
        return {
            "size": list(self.size),
            "stride": list(self.stride),
            "start": list(self.start),
            "global": self.is_global,
        }

    def describe(self) -> str:
        """Short human form: ``"7 /2 @-1"`` (size, stride, start) or ``"global"``."""
        if self.is_global:
            return "global"

        def one(t: tuple[int, int]) -> str:
            return str(t[0]) if t[0] == t[1] else f"{t[0]}x{t[1]}"

        return f"{one(self.size)} /{one(self.stride)} @{one(self.start)}"


def conv_like(
    rf: ReceptiveField,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
) -> ReceptiveField:
    """Field after a convolution or pooling window (kernel, stride, padding, dilation)."""
    if rf.is_global:
        return rf
    k, d, p = _pair(kernel_size), _pair(dilation), _pair(padding)
    s = _pair(stride if stride not in (None, (), []) else kernel_size)
    size = tuple(rf.size[i] + d[i] * (k[i] - 1) * rf.stride[i] for i in range(2))
    start = tuple(rf.start[i] - p[i] * rf.stride[i] for i in range(2))
    new_stride = tuple(rf.stride[i] * s[i] for i in range(2))
    return ReceptiveField(size=size, stride=new_stride, start=start)


def padded(rf: ReceptiveField, top: int, left: int) -> ReceptiveField:
    """Field after explicit padding (``F.pad``) with ``top``/``left`` pixels before the map."""
    if rf.is_global:
        return rf
    return ReceptiveField(
        size=rf.size,
        stride=rf.stride,
        start=(rf.start[0] - top * rf.stride[0], rf.start[1] - left * rf.stride[1]),
    )


def union(fields: Sequence[ReceptiveField]) -> ReceptiveField:
    """Smallest field containing all of ``fields`` for the same output unit.

    Fields with different strides (maps at different resolutions that were resized to match)
    are combined with the coarser stride.
    """
    fields = list(fields)
    if not fields:
        raise ValueError("union of no receptive fields")
    glob = [f for f in fields if f.is_global]
    if glob:
        return glob[0]
    stride = tuple(max(f.stride[i] for f in fields) for i in range(2))
    start = tuple(min(f.start[i] for f in fields) for i in range(2))
    end = tuple(max(f.start[i] + f.size[i] for f in fields) for i in range(2))
    size = tuple(end[i] - start[i] for i in range(2))
    return ReceptiveField(size=size, stride=stride, start=start)
