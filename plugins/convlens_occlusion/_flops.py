"""How much of a model's work an occluder really changes: Krypton's theoretical bound.

Krypton (Nakandala, Kumar & Papakonstantinou, SIGMOD 2019, Section 3.2, Eqs. 1–6) bounds the
speed-up of exact incremental inference by counting multiply-adds. An occluder that changes an
``h``×``w`` box of a layer's input changes, in the output of a convolution or pooling window with
kernel ``k``, stride ``s`` (and padding ``p``, dilation ``d``), the units whose window reaches into
the box — Krypton's output patch ``min(⌈(h + k − 1) / s⌉, H_out)`` per axis away from the borders;
exactly, per axis, output rows ``⌈(y0 + p − d(k − 1)) / s⌉ … ⌊(y1 − 1 + p) / s⌋`` clipped to the
map. A layer then costs its full multiply-adds times the fraction of its output that changes.
The bound is

    bound = Σ_positions Σ_layers MACs_full(layer)  /  Σ_positions Σ_layers MACs_changed(layer, position)

i.e. the speed-up of a whole sweep over full forwards if nothing but the changed units were
computed, with Krypton's per-layer formula applied at every position of the grid (boxes clipped
at the image border, so border positions cost less than Krypton's interior formula).

The changed box is followed through the ``torch.fx`` graph the incremental executor runs: windows
(convolution, max / average pooling) widen it as above; per-pixel ops keep it (activations,
eval-mode BatchNorm, LayerNorm or ``Linear`` over channels, per-channel scaling, ``permute``, which
only moves the spatial axes); a sum, product or channel concatenation of changed maps takes the
union of their boxes; anything that mixes all positions (global pooling, flatten, a fully connected
layer on flattened maps, a squeeze-excitation gate multiplied back into its map) changes its whole
output, and everything after it costs its full multiply-adds. Only convolutions and ``Linear``
layers are counted (pooling, norms and activations are a fraction of a percent of the
multiply-adds of these models).

Next to the bound, :func:`flop_report` gives what the executor's plan actually runs per position
(its patches have one size for all positions: the largest changed box) and the share of the
model's multiply-adds that the plan runs on patches.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ._incremental import (
    _BINARY_FUNCTIONS,
    _BINARY_METHODS,
    ImageCache,
    IncrementalOcclusion,
    _is_shape_query,
    _node_label,
    _Plan,
    _window_of,
)

__all__ = ["flop_report", "FlopReport"]


@dataclass
class _Boxes:
    """Per position, the changed box ``[y0, y1) × [x0, x1)`` of a map whose spatial axes are
    ``axes`` (2, 3 for NCHW; 1, 2 after a permute to NHWC) and whose size is ``H``×``W``."""

    y0: np.ndarray
    y1: np.ndarray
    x0: np.ndarray
    x1: np.ndarray
    axes: tuple[int, int]
    H: int
    W: int
    ky: np.ndarray  # Krypton's patch size (its Eq., no alignment), per position
    kx: np.ndarray

    def area(self) -> np.ndarray:
        return np.clip(self.y1 - self.y0, 0, None) * np.clip(self.x1 - self.x0, 0, None)

    def krypton_area(self) -> np.ndarray:
        return self.ky * self.kx

    def moved(self, axes: tuple[int, int]) -> _Boxes:
        return _Boxes(self.y0, self.y1, self.x0, self.x1, axes, self.H, self.W, self.ky, self.kx)

    def union(self, other: _Boxes) -> _Boxes:
        return _Boxes(
            np.minimum(self.y0, other.y0), np.maximum(self.y1, other.y1),
            np.minimum(self.x0, other.x0), np.maximum(self.x1, other.x1),
            self.axes, self.H, self.W,
            np.minimum(np.maximum(self.ky, other.ky), self.H),
            np.minimum(np.maximum(self.kx, other.kx), self.W),
        )  # fmt: skip


FULL = "full"


def _window_axis(a0, a1, k, s, d, p, out):
    """Output rows ``[lo, hi)`` changed by input rows ``[a0, a1)`` (Krypton, exact at borders)."""
    lo = -((-(a0 + p - d * (k - 1))) // s)  # ceil
    hi = (a1 - 1 + p) // s + 1
    lo, hi = np.clip(lo, 0, out), np.clip(hi, 0, out)
    return lo, np.maximum(hi, lo)


def _spatial(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and v.dim() == 4


@dataclass
class FlopReport:
    """Multiply-adds per position (one image): ``full`` (a full forward), ``executed`` (what
    the plan runs), ``changed`` (only the changed units: Krypton's bound, averaged over
    positions), ``krypton`` (Krypton's patch-size equation instead of the exact box: the
    worst alignment of the box with the stride); ``patch_share``: the share of ``full`` in layers the plan runs on patches.
    ``layers``: per convolution / linear layer, the same numbers."""

    full: float
    executed: float
    changed: float
    krypton: float
    patch_share: float
    layers: list[dict]
    #: per convolution on patches: (MACs per unit, changed rows [P], changed columns [P])
    extents: list[tuple[float, np.ndarray, np.ndarray]] | None = None

    @property
    def bound(self) -> float:
        return self.full / max(self.changed, 1e-30)

    @property
    def bound_krypton(self) -> float:
        return self.full / max(self.krypton, 1e-30)

    @property
    def planned(self) -> float:
        return self.full / max(self.executed, 1e-30)

    def to_dict(self) -> dict[str, Any]:
        return {
            "definition": "multiply-adds of convolutions and linear layers per position, mean "
            "over positions; bound = full / changed (exact changed units); bound_krypton = full "
            "/ krypton (Krypton SIGMOD 2019 Sec. 3.2 patch-size equation per layer); planned = "
            "full / executed (the executor's plan)",
            "macs_full": round(self.full),
            "macs_executed": round(self.executed),
            "macs_changed": round(self.changed),
            "macs_krypton": round(self.krypton),
            "patch_share": round(self.patch_share, 4),
            "bound": round(self.bound, 3),
            "bound_krypton": round(self.bound_krypton, 3),
            "planned": round(self.planned, 3),
            "layers": self.layers,
        }


def _macs_per_unit(engine: IncrementalOcclusion, n: fx.Node, cached) -> tuple[float, str] | None:
    """Multiply-adds per output unit (pixel of a map, or row of a linear layer) and the kind."""
    module = engine._module(n)
    if isinstance(module, nn.Conv2d):
        return float(module.weight.numel()), "conv"
    if isinstance(module, nn.Linear):
        return float(module.weight.numel()), "linear"
    if n.op == "call_function" and n.target in (F.conv2d, torch.conv2d, F.linear):
        w = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
        w = cached.get(w) if isinstance(w, fx.Node) else w
        if isinstance(w, torch.Tensor):
            return float(w.numel()), "conv" if n.target is not F.linear else "linear"
    return None


def _units(value: torch.Tensor, kind: str) -> float:
    """Output units of one image: pixels of a map, rows of a linear layer."""
    if kind == "conv":
        return float(value.shape[-2] * value.shape[-1])
    return float(value[0].numel() / value.shape[-1]) if value.dim() > 1 else 1.0


def flop_report(
    engine: IncrementalOcclusion, image: ImageCache, plan: _Plan, boxes: np.ndarray
) -> FlopReport:
    """Krypton's bound and the plan's work for the occluder ``boxes`` (``[P, 4]`` of
    ``x0, y0, x1, y1``, clipped, exclusive ends) on the graph of ``engine`` (module docstring)."""
    cached = image.values
    state: dict[fx.Node, Any] = {}
    b = boxes.astype(np.int64)

    def const(a):
        return fx.node.map_arg(a, lambda m: cached[m]) if isinstance(a, (fx.Node, tuple)) else a

    full = executed = changed = krypton = patch_full = 0.0
    layers: list[dict] = []
    extents: list[tuple[float, np.ndarray, np.ndarray]] = []
    for n in engine.nodes:
        value = cached.get(n)
        if n.op == "placeholder":
            H, W = value.shape[-2:]
            state[n] = _Boxes(b[:, 1], b[:, 3], b[:, 0], b[:, 2], (2, 3), int(H), int(W),
                              b[:, 3] - b[:, 1], b[:, 2] - b[:, 0])  # fmt: skip
            continue
        if n.op == "output" or not engine._dep[n]:
            state[n] = None
            continue
        ins = [state.get(a) for a in n.all_input_nodes]
        ch = [s for s in ins if s is not None]
        st: Any = None
        if not ch or _is_shape_query(n):
            st = None
        elif any(s is FULL for s in ch):
            st = FULL
        else:
            st = _propagate(engine, n, value, cached, state, const)
        state[n] = st
        per = _macs_per_unit(engine, n, cached)
        if per is None or not isinstance(value, torch.Tensor):
            continue
        per_unit, kind = per
        units = _units(value, kind)
        f = per_unit * units
        if isinstance(st, _Boxes):
            if kind == "conv":
                extents.append((per_unit, st.y1 - st.y0, st.x1 - st.x0))
            c = per_unit * float(st.area().mean())
            k = per_unit * float(st.krypton_area().mean())
        else:
            c = k = f if st is FULL else 0.0
        g = plan.geoms.get(n)
        action = plan.actions.get(n, ("run", None))[0]
        on_patch = g is not None and action in ("local", "window_pointwise", "pointwise")
        e = per_unit * g.h * g.w if on_patch else f
        full += f
        executed += e
        changed += c
        krypton += k
        patch_full += f if on_patch else 0.0
        layers.append({
            "node": _node_label(n), "kind": kind, "macs_full": round(f),
            "macs_executed": round(e), "macs_changed": round(c), "macs_krypton": round(k),
            "mode": "patch" if on_patch else "full",
        })  # fmt: skip
    return FlopReport(
        full, executed, changed, krypton, patch_full / max(full, 1e-30), layers, extents
    )


def _propagate(engine, n, value, cached, state, const) -> Any:
    """The changed boxes of node ``n`` whose changed inputs all carry boxes."""
    first = n.args[0] if n.args else None
    src = state.get(first) if isinstance(first, fx.Node) else None
    others = [a for a in n.all_input_nodes if a is not first]
    others_changed = [state[a] for a in others if state.get(a) is not None]
    module = engine._module(n)
    if not isinstance(value, torch.Tensor):
        return FULL
    # convolution / pooling windows on NCHW maps
    if isinstance(src, _Boxes) and src.axes == (2, 3) and not others_changed and _spatial(value):
        win = _window_of(n, module, const)
        if win is not None:
            H, W = value.shape[-2:]
            y0, y1 = _window_axis(src.y0, src.y1, win.kernel[0], win.stride[0],
                                  win.dilation[0], win.pad[0], H)  # fmt: skip
            x0, x1 = _window_axis(src.x0, src.x1, win.kernel[1], win.stride[1],
                                  win.dilation[1], win.pad[1], W)  # fmt: skip
            # Krypton's Eq.: min(ceil((h + k - 1) / s), H_out), k the dilated kernel
            ke = [win.dilation[i] * (win.kernel[i] - 1) + 1 for i in range(2)]
            ky = np.minimum(-((-(src.ky + ke[0] - 1)) // win.stride[0]), H)
            kx = np.minimum(-((-(src.kx + ke[1] - 1)) // win.stride[1]), W)
            return _Boxes(y0, y1, x0, x1, (2, 3), int(H), int(W), ky, kx)
    # permute moves the spatial axes
    if n.op == "call_method" and n.target == "permute" and isinstance(src, _Boxes):
        dims = [int(d) for d in (n.args[1:] if len(n.args) > 2 else n.args[1])]
        if len(dims) == 4:
            return src.moved((dims.index(src.axes[0]), dims.index(src.axes[1])))
        return FULL
    if isinstance(src, _Boxes) and not others_changed and _keeps_pixels(engine, n, module, src,
                                                                       value, cached, const):  # fmt: skip
        return src
    # sums / products / concatenations of changed maps: the union of their boxes
    changed = [state[a] for a in n.all_input_nodes if isinstance(state.get(a), _Boxes)]
    if len(changed) >= 2 and all(c.axes == changed[0].axes for c in changed):
        combining = (
            (n.op == "call_function" and n.target in _BINARY_FUNCTIONS)
            or (n.op == "call_method" and n.target in _BINARY_METHODS)
            or (n.op == "call_function" and n.target is torch.cat and _cat_dim(n) not in
                changed[0].axes)
        )  # fmt: skip
        if combining and all(state.get(a) is None or isinstance(state[a], _Boxes)
                             for a in n.all_input_nodes):  # fmt: skip
            out = changed[0]
            for c in changed[1:]:
                out = out.union(c)
            return out
    if n.op == "call_function" and n.target is torch.cat and isinstance(src, _Boxes):
        if _cat_dim(n) not in src.axes:
            return src
    if (
        n.op == "call_function" and n.target is torch.cat and not isinstance(src, _Boxes)
        and len(changed) == 1 and _cat_dim(n) not in changed[0].axes
    ):  # fmt: skip
        return changed[0]
    return FULL


def _cat_dim(n: fx.Node) -> int:
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
    return int(dim) % 4


def _keeps_pixels(engine, n, module, src: _Boxes, value, cached, const) -> bool:
    """A per-pixel op: each output pixel depends on the same pixel of the changed input only."""
    if value.dim() != 4 or tuple(value.shape[a] for a in src.axes) != (src.H, src.W):
        return False
    last_is_channel = 3 not in src.axes
    if isinstance(module, nn.Linear) or (n.op == "call_function" and n.target is F.linear):
        return last_is_channel
    if isinstance(module, nn.LayerNorm) or (n.op == "call_function" and n.target is F.layer_norm):
        shape = module.normalized_shape if module is not None else const(n.args[1])
        return last_is_channel and len(tuple(shape)) == 1
    if src.axes != (2, 3):
        # other per-pixel ops in NHWC: activations and scaling by per-channel constants
        others = [cached.get(a) for a in n.all_input_nodes if a is not n.args[0]]
        if any(isinstance(o, torch.Tensor) and o.dim() >= 3 and (o.shape[-3] > 1 or o.shape[-2] > 1)
               for o in others):  # fmt: skip
            return False
    others = [a for a in n.all_input_nodes if a is not n.args[0]]
    if module is not None:
        return engine._pointwise(n, module, const, cached, others)
    if n.op == "call_method" and n.target in ("contiguous", "float"):
        return True
    if n.op == "call_function" and n.target in (F.dropout, operator.getitem):
        return n.target is F.dropout
    return engine._pointwise(n, module, const, cached, others)
