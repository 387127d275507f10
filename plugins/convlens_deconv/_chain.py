"""The deconvnet of Section 2.1, literally: a chain network walked backwards layer by layer.

For a chain-structured convnet (zfnet, alexnet, VGG) the engine's layer trace is a list of leaf
layers each feeding the next. Projecting a chosen activation walks that list backwards from the
chosen layer (Zeiler & Fergus, Section 2.1 and Fig. 1):

* the chosen activation is kept, every other activation of the layer set to zero;
* **rectify** (ReLU and its family): ``relu`` of the signal (rule ``deconvnet``); the ``guided``
  and ``gradient`` rules (:mod:`convlens_deconv._general`) also need the rectifier's forward
  input, a window of which is read from the recording;
* **unpool** (max pooling): each value goes to the input position its pooling window's switch
  recorded; where overlapping windows (3×3, stride 2) chose the same position the values are
  *added* (a scatter-add; ``F.max_unpool2d`` would overwrite and lose signal);
* **filter** (convolution): the transposed convolution with the same weights — ``conv_transpose2d``
  honouring stride, dilation and groups — and no bias; padding is honoured by placing the result
  at offset ``y·stride − padding`` and discarding what falls on the padding (so no
  ``output_padding`` is needed and the projection has exactly the input's shape, ``ceil_mode``
  pools included);
* **contrast normalisation** (LRN) is skipped (``mode="paper"``) or replaced by its true gradient
  at the recorded input (``mode="captum"``);
* linear layers use their transposed weights; flatten/reshape restore the map; dropout and
  identity pass; eval-mode BatchNorm scales by ``gamma / sqrt(running_var + eps)``; average
  pooling uses its (input-independent) transpose.

**Receptive-field windows.** A single activation at ``(y, x)`` only reaches the units inside its
receptive field at each layer below. Each projection is therefore carried as a small window of the
map (its size grows layer by layer exactly as the receptive field does) with a per-projection
offset, so a zfnet conv5 projection computes the transposed conv1 on 67×67 positions instead of
110×110; many projections (from many images) go down together as one batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from convlens.engine import LayerCall, PoolSwitch, Recording
from convlens_deconv._general import RECTIFIERS, module_slope

__all__ = ["ChainPlan", "ChainStep", "build_chain_plan", "reverse_chain", "unpool"]

_RECTIFIER_MODULES: tuple[type, ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.Hardtanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Softplus,
    nn.PReLU,
    nn.RReLU,
)
_IDENTITY_MODULES: tuple[type, ...] = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.AlphaDropout)
_RESHAPE_FUNCTIONS = frozenset({"flatten", "view", "reshape"})
_IDENTITY_FUNCTIONS = frozenset({"dropout", "dropout2d", "alpha_dropout"})


@dataclass
class ChainStep:
    """One leaf layer of the chain and how the deconvnet inverts it."""

    kind: str  # rectify | unpool | conv | lrn | linear | reshape | identity | bn | vjp
    call: LayerCall
    module: nn.Module | None = None
    input_name: str | None = None  # the layer whose output is this step's input (LRN vjp)
    pool: tuple = ()  # unpool: (kernel, stride, dilation) from the recorded switches

    def op(self) -> nn.Module:
        """The rectifier as a module (guided / gradient rules; functional relu/relu6 too)."""
        if self.module is not None:
            return self.module
        return nn.ReLU() if self.call.type == "relu" else nn.ReLU6()


@dataclass
class ChainPlan:
    """The target layer's leaf and the steps below it, in reverse (deconvnet) order."""

    target: str
    target_call: LayerCall
    steps: list[ChainStep] = field(default_factory=list)
    input_shape: tuple[int, ...] = ()

    def window_elements(self) -> int:
        """The largest number of values one projection's window holds on the way down (what a
        batch of projections costs in memory, per projection)."""
        out = tuple(self.target_call.output_shape or ())
        if len(out) == 4:
            h = w = 1
            spatial = True
        else:
            h = w = 0
            spatial = False
        largest = 1
        for step in self.steps:
            shape = tuple(step.call.input_shape)
            if step.kind in ("unpool", "conv") and spatial:
                if step.kind == "unpool":
                    k, st, d = step.pool
                else:
                    m = step.module
                    k, st, d = tuple(m.kernel_size), tuple(m.stride), tuple(m.dilation)
                h = (h - 1) * st[0] + d[0] * (k[0] - 1) + 1
                w = (w - 1) * st[1] + d[1] * (k[1] - 1) + 1
            elif step.kind in ("reshape", "vjp") and len(shape) == 4:
                h, w, spatial = shape[-2], shape[-1], True
            if len(shape) == 4:
                largest = max(largest, shape[1] * h * w)
            elif len(shape) == 2:
                largest = max(largest, shape[1])
        return largest

    @property
    def lrn_inputs(self) -> list[str]:
        """Layers whose outputs the captum mode needs (the inputs of LRN steps)."""
        return [s.input_name for s in self.steps if s.kind == "lrn" and s.input_name]

    @property
    def rectifier_inputs(self) -> list[str]:
        """Layers whose outputs the guided and gradient rules need (the rectifiers' inputs)."""
        return [s.input_name for s in self.steps if s.kind == "rectify" and s.input_name]


class NotAChain(Exception):
    """Internal: why the literal chain deconvnet does not apply (message = the reason)."""


def _kind_of(call: LayerCall, module: nn.Module | None, mode: str) -> str:
    if call.kind == "module":
        m = module
        if isinstance(m, _RECTIFIER_MODULES):
            return "rectify"
        if isinstance(m, nn.MaxPool2d):
            return "unpool"
        if isinstance(m, nn.Conv2d):
            if m.padding_mode != "zeros":
                raise NotAChain(f"{call.name}: padding_mode={m.padding_mode!r}")
            return "conv"
        if isinstance(m, nn.LocalResponseNorm):
            return "lrn"
        if isinstance(m, nn.Linear):
            return "linear"
        if isinstance(m, nn.Flatten):
            return "reshape"
        if isinstance(m, _IDENTITY_MODULES):
            return "identity"
        if isinstance(m, nn.BatchNorm2d):
            if m.training or m.running_var is None:
                raise NotAChain(f"{call.name}: BatchNorm2d not in eval mode with running stats")
            return "bn"
        if isinstance(m, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
            return "vjp"
        raise NotAChain(f"{call.name}: {call.type} is not a chain layer")
    name = call.type
    if name in RECTIFIERS:
        return "rectify"
    if name in ("max_pool2d", "max_pool2d_with_indices"):
        return "unpool"
    if name in _RESHAPE_FUNCTIONS:
        return "reshape"
    if name in _IDENTITY_FUNCTIONS:
        return "identity"
    if name == "adaptive_avg_pool2d":
        return "vjp"
    if name == "local_response_norm" and mode == "paper":
        return "lrn"
    raise NotAChain(f"{call.name}: functional {name} is not supported by the chain deconvnet")


def _target_leaf(rec: Recording, target: LayerCall) -> LayerCall:
    if target.leaf:
        return target
    last = None
    for call in rec.trace[target.index + 1 :]:
        if call.depth <= target.depth:
            break
        if call.leaf:
            last = call
    if last is None:
        raise NotAChain(f"{target.name}: has no leaf layer")
    return last


def build_chain_plan(
    model: nn.Module, rec: Recording, layer: str, mode: str = "paper", rule: str = "deconvnet"
) -> ChainPlan:
    """The chain plan for ``layer`` from a recorded trace; raises :class:`NotAChain` (with the
    reason) when the layers up to ``layer`` are not a chain of supported layers."""
    target = rec.layer(layer)
    leaf = _target_leaf(rec, target)
    leaves = [c for c in rec.leaves() if c.index <= leaf.index]
    modules = dict(model.named_modules())
    steps: list[ChainStep] = []
    prev_shape = tuple(rec.input_shape or ())
    prev_name: str | None = None
    for call in leaves:
        if call.input_shape is None or tuple(call.input_shape) != prev_shape:
            raise NotAChain(
                f"{call.name}: its input {call.input_shape} is not the previous layer's output "
                f"{prev_shape}"
            )
        module = modules.get(call.module) if call.kind == "module" else None
        kind = _kind_of(call, module, mode)
        if kind == "unpool" and call.name not in rec.switches:
            raise NotAChain(f"{call.name}: no switches were recorded")
        if kind == "vjp" and call.kind != "module" and call.type != "adaptive_avg_pool2d":
            raise NotAChain(f"{call.name}: cannot replay {call.type}")
        if kind == "linear" and len(prev_shape) != 2:
            raise NotAChain(f"{call.name}: Linear on a {len(prev_shape)}-d input")
        if kind == "rectify" and rule != "deconvnet":
            if prev_name is None:
                raise NotAChain(f"{call.name}: a rectifier on the model input")
            if module is None and call.type not in ("relu", "relu6"):
                raise NotAChain(f"{call.name}: functional {call.type} under the {rule} rule")
        pool = ()
        if kind == "unpool":
            sw = rec.switches[call.name]
            pool = (sw.kernel_size, sw.stride, sw.dilation)
        steps.append(ChainStep(kind, call, module, input_name=prev_name, pool=pool))
        prev_shape = tuple(call.output_shape or ())
        prev_name = call.name
    if not steps:
        raise NotAChain(f"{layer}: no layers below it")
    return ChainPlan(layer, leaf, list(reversed(steps)), tuple(rec.input_shape or ()))


# ----------------------------------------------------------------------------------------------
# Windows: a projection's signal at one layer lives in a [h, w] window at per-projection offsets.
# ----------------------------------------------------------------------------------------------


def _pair(v) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(a) for a in v)
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


def _span(off: int, size: int, limit: int) -> tuple[int, int, int, int]:
    """Window ``[off, off+size)`` against a map ``[0, limit)``: (map start, map end, window start,
    window end) of the overlap (empty when start >= end)."""
    a, b = max(off, 0), min(off + size, limit)
    return a, b, a - off, b - off


def zero_outside(
    g: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, H: int, W: int
) -> torch.Tensor:
    """Zero (in place) the parts of windows ``[S, C, h, w]`` that lie outside an ``H×W`` map
    (the convolution's padding, or beyond a ceil-mode pool's input)."""
    h, w = g.shape[-2:]
    if not bool(((oy < 0) | (oy + h > H) | (ox < 0) | (ox + w > W)).any()):
        return g
    ry = oy[:, None] + torch.arange(h, device=g.device)[None]
    rx = ox[:, None] + torch.arange(w, device=g.device)[None]
    vy = (ry >= 0) & (ry < H)
    vx = (rx >= 0) & (rx < W)
    return g.mul_((vy[:, None, :, None] & vx[:, None, None, :]).to(g.dtype))


def gather_window(
    full: torch.Tensor,
    rows: torch.Tensor,
    oy: torch.Tensor,
    ox: torch.Tensor,
    h: int,
    w: int,
    fill: float | int = 0,
    contiguous: bool = True,
) -> torch.Tensor:
    """``full[rows[s], :, oy[s]:oy[s]+h, ox[s]:ox[s]+w]`` for every s; ``fill`` outside the map.
    One advanced-indexing gather (no Python loop over the windows, no padded copy)."""
    S = rows.numel()
    N, C, H, W = full.shape
    if S == 0:
        return full.new_full((0, C, h, w), fill)
    dev = full.device
    ys = oy.to(dev)[:, None] + torch.arange(h, device=dev)[None]  # [S, h]
    xs = ox.to(dev)[:, None] + torch.arange(w, device=dev)[None]  # [S, w]
    vy, vx = (ys >= 0) & (ys < H), (xs >= 0) & (xs < W)
    r = rows.to(dev)[:, None, None]
    out = full.permute(0, 2, 3, 1)[
        r, ys.clamp(0, H - 1)[:, :, None], xs.clamp(0, W - 1)[:, None, :]
    ]  # [S, h, w, C]
    if not bool(vy.all() and vx.all()):
        valid = (vy[:, :, None] & vx[:, None, :])[..., None]
        out = torch.where(valid, out, torch.as_tensor(fill, dtype=out.dtype, device=dev))
    out = out.permute(0, 3, 1, 2)
    return out.contiguous() if contiguous else out


def paste(g: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Windows ``[S, C, h, w]`` at offsets → full maps ``[S, C, H, W]`` (outside: zero)."""
    S, C, h, w = g.shape
    out = torch.zeros(S, C, H, W, dtype=g.dtype, device=g.device)
    for s, (y, x) in enumerate(zip(oy.tolist(), ox.tolist(), strict=True)):
        y0, y1, a, b = _span(y, h, H)
        x0, x1, c, d = _span(x, w, W)
        if a < b and c < d:
            out[s, :, y0:y1, x0:x1] = g[s, :, a:b, c:d]
    return out


def unpool(
    grad: torch.Tensor, switch: PoolSwitch | torch.Tensor, input_hw: tuple[int, int] | None = None
) -> torch.Tensor:
    """Full-map unpooling with switches (Fig. 1, bottom): ``grad`` ``[N, C, Ho, Wo]`` goes to the
    recorded argmax positions of an input of ``input_hw``, *adding* where several windows chose the
    same position. ``switch`` is a :class:`~convlens.engine.PoolSwitch` or its indices tensor."""
    idx = switch.indices if isinstance(switch, PoolSwitch) else switch
    hw = tuple(switch.input_shape[-2:]) if isinstance(switch, PoolSwitch) else input_hw
    if hw is None:
        raise ValueError("unpool: input_hw is needed when switch is a tensor")
    n, c = grad.shape[:2]
    out = torch.zeros(n, c, hw[0] * hw[1], dtype=grad.dtype, device=grad.device)
    out.scatter_add_(2, idx.reshape(n, c, -1).to(grad.device), grad.reshape(n, c, -1))
    return out.reshape(n, c, *hw)


def _switch_offsets(sw: PoolSwitch, wi: int, device) -> torch.Tensor:
    """Each switch as ``dy * wi + dx``: its position inside its own pooling window (``dy, dx`` in
    ``[0, dilation·(kernel−1)]``), flattened for an input-side window ``wi`` wide. Kept as float32
    (exact for these small integers): strided integer copies are far slower on CPU."""
    idx = sw.indices.to(device)
    Ho, Wo = idx.shape[-2:]
    Wi = sw.input_shape[-1]
    iy = torch.div(idx, Wi, rounding_mode="floor")
    ix = idx - iy * Wi
    y0 = torch.arange(Ho, device=device)[:, None] * sw.stride[0] - sw.padding[0]
    x0 = torch.arange(Wo, device=device)[None, :] * sw.stride[1] - sw.padding[1]
    return ((iy - y0) * wi + (ix - x0)).to(torch.float32)


def _unpool_window(g, oy, ox, rows, sw: PoolSwitch, cache: dict):
    """Unpool windows: each window value goes to its switch inside the input-side window that
    covers the pooling windows of the output-side window (a scatter-add). Positions of a window
    outside the map hold zeros (an invariant of :func:`reverse_chain`), so they add nothing."""
    S, C, h, w = g.shape
    (kh, kw), (sh, sw_), (ph, pw), (dh, dw) = sw.kernel_size, sw.stride, sw.padding, sw.dilation
    hi, wi = (h - 1) * sh + dh * (kh - 1) + 1, (w - 1) * sw_ + dw * (kw - 1) + 1
    key = (sw.name, wi)
    if key not in cache:
        cache[key] = _switch_offsets(sw, wi, g.device)
    off = gather_window(cache[key], rows, oy, ox, h, w, fill=0)
    base = (
        torch.arange(h, device=g.device)[:, None] * (sh * wi)
        + torch.arange(w, device=g.device)[None, :] * sw_
    )
    flat = (off.long() + base).reshape(S, C, -1)
    out = torch.zeros(S, C, hi * wi, dtype=g.dtype, device=g.device)
    out.scatter_add_(2, flat, g.reshape(S, C, -1))
    return out.reshape(S, C, hi, wi), oy * sh - ph, ox * sw_ - pw


def conv_transpose(g: torch.Tensor, m: nn.Conv2d) -> torch.Tensor:
    """The deconvnet's filtering: ``g`` through the transposed filters of ``m`` (no bias, no
    padding: the caller places the result at ``offset·stride − padding``).

    For a first layer on CPU (few input channels, stride > 1) the same result is computed as one
    stride-1 convolution with the stride² sub-kernels followed by a pixel shuffle, which runs
    2–3× faster there than ``conv_transpose2d`` (the output has only 3 channels); everywhere else
    ``conv_transpose2d``."""
    w = m.weight.to(g.dtype)
    s = tuple(m.stride)
    if (
        g.device.type == "cpu"
        and m.in_channels <= 8
        and s[0] == s[1] > 1
        and m.groups == 1
        and tuple(m.dilation) == (1, 1)
    ):
        return _subpixel_transpose(g, w, s[0])
    return F.conv_transpose2d(g, w, None, m.stride, 0, 0, m.groups, m.dilation)


def _subpixel_transpose(g: torch.Tensor, w: torch.Tensor, s: int) -> torch.Tensor:
    # Output row s·q + r collects g[q − j]·w[r + s·j]: for each phase (r_y, r_x) a stride-1
    # convolution with the sub-kernel w[r_y::s, r_x::s]; pixel_shuffle interleaves the phases.
    cin, cout, kh, kw = w.shape
    K, L = -(-kh // s), -(-kw // s)
    wp = F.pad(w, (0, L * s - kw, 0, K * s - kh))
    wp = wp.reshape(cin, cout, K, s, L, s).permute(1, 3, 5, 0, 2, 4)
    wc = wp.reshape(cout * s * s, cin, K, L).flip(-1, -2)
    out = F.pixel_shuffle(F.conv2d(g, wc, None, 1, (K - 1, L - 1)), s)
    h, ww = g.shape[-2:]
    return out[..., : (h - 1) * s + kh, : (ww - 1) * s + kw]


def _conv_padding(m: nn.Conv2d) -> tuple[int, int]:
    if isinstance(m.padding, str):
        if m.padding == "valid":
            return (0, 0)
        kh, kw = m.kernel_size
        dh, dw = m.dilation
        return (dh * (kh - 1) // 2, dw * (kw - 1) // 2)  # 'same': the extra pixel goes last
    return _pair(m.padding)


def reverse_chain(
    plan: ChainPlan,
    rec: Recording,
    rows: torch.Tensor,
    channels: torch.Tensor,
    ys: torch.Tensor,
    xs: torch.Tensor,
    values: torch.Tensor,
    mode: str = "paper",
    cache: dict | None = None,
    rule: str = "deconvnet",
) -> torch.Tensor:
    """Project seeds down the chain: seed ``s`` is ``values[s]`` at (``rows[s]`` — the batch row
    of the recorded pass —, ``channels[s]``, ``ys[s]``, ``xs[s]``) of the plan's target layer.
    Returns ``[S, C_in, H, W]`` in input space. ``cache`` (a dict kept for one recording) saves
    re-deriving the switch offsets when several batches of seeds share the recording.

    Invariant: window positions outside their layer's map hold zeros."""
    cache = {} if cache is None else cache
    S = rows.numel()
    out_shape = tuple(plan.target_call.output_shape or ())
    dev, dtype = values.device, values.dtype
    s_idx = torch.arange(S, device=dev)
    if len(out_shape) == 4:
        g = torch.zeros(S, out_shape[1], 1, 1, device=dev, dtype=dtype)
        g[s_idx, channels, 0, 0] = values
        oy, ox = ys.clone(), xs.clone()
    elif len(out_shape) == 2:
        g = torch.zeros(S, out_shape[1], device=dev, dtype=dtype)
        g[s_idx, channels] = values
        oy = ox = torch.zeros(S, dtype=torch.long, device=dev)
    else:
        raise NotAChain(f"{plan.target}: output of shape {out_shape} is not [N, C, H, W] or [N, F]")
    for step in plan.steps:
        call = step.call
        in_shape = tuple(call.input_shape)
        kind = step.kind
        if kind == "rectify":
            if rule == "deconvnet":
                g = g.clamp_(min=0)
            else:  # the forward op's slope at its recorded input, on this window
                key = ("slope", rule, call.name)
                if key not in cache:  # once per recording, shared by every batch of seeds
                    full = rec.activations[step.input_name].to(g.dtype)
                    op = step.op()
                    slope = module_slope(op, full)
                    if isinstance(op, (nn.ReLU, nn.Hardtanh)):  # 0/1: keep a boolean gate
                        slope = slope > 0
                    elif rule == "guided":
                        slope = slope.clamp_(min=0)
                    cache[key] = slope
                slope = cache[key]
                if g.dim() == 4:
                    slope = gather_window(slope, rows, oy, ox, *g.shape[-2:], contiguous=False)
                else:
                    slope = slope[rows]
                if rule == "guided":
                    g = g.clamp_(min=0)
                if slope.dtype == torch.bool:
                    g = g.masked_fill_(~slope, 0.0)
                else:
                    g = g.mul_(slope)
        elif kind == "identity":
            pass
        elif kind == "unpool":
            g, oy, ox = _unpool_window(g, oy, ox, rows, rec.switches[call.name], cache)
        elif kind == "conv":
            m = step.module
            g = conv_transpose(g, m)
            ph, pw = _conv_padding(m)
            oy, ox = oy * m.stride[0] - ph, ox * m.stride[1] - pw
            g = zero_outside(g, oy, ox, *in_shape[-2:])  # what fell on the padding
        elif kind == "lrn":
            if mode == "captum" or rule == "gradient":
                g = _lrn_vjp(step, rec, rows, g, oy, ox)
        elif kind == "bn":
            m = step.module
            gain = torch.rsqrt(m.running_var.to(g.dtype) + m.eps)
            if m.weight is not None:
                gain = gain * m.weight.to(g.dtype)
            g = g * gain.reshape(1, -1, 1, 1)
        elif kind == "linear":
            g = g @ step.module.weight.to(g.dtype)
        elif kind == "reshape":
            if g.dim() == 4:  # a spatial signal through a flatten: make it whole again
                g = paste(g, oy, ox, *tuple(call.output_shape[-2:]))
            g = g.reshape(S, *in_shape[1:])
            oy = ox = torch.zeros(S, dtype=torch.long, device=dev)
        elif kind == "vjp":
            g = _linear_vjp(step, g, oy, ox, in_shape)
            oy = ox = torch.zeros(S, dtype=torch.long, device=dev)
        else:  # pragma: no cover - kinds are closed
            raise NotAChain(f"{call.name}: unknown step {kind}")
    H, W = plan.input_shape[-2:]
    if g.dim() != 4:
        raise NotAChain(f"{plan.target}: the chain does not end at a spatial input")
    return paste(g, oy, ox, H, W)


def _channel_window_sum(t: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """``out[:, c] = sum(t[:, c - before : c + after + 1])`` (zero outside the channels)."""
    C = t.shape[1]
    tp = F.pad(t, (0, 0, 0, 0, before, after))
    out = tp[:, :C].clone()
    for i in range(1, before + after + 1):
        out += tp[:, i : i + C]
    return out


def lrn_vjp(
    x: torch.Tensor, g: torch.Tensor, size: int, alpha: float, beta: float, k: float
) -> torch.Tensor:
    """The true gradient (vector-Jacobian product) of ``F.local_response_norm(x, size, alpha,
    beta, k)`` against ``g``, in closed form: with ``D = k + alpha/size * sum_window(x^2)``
    (PyTorch's window: ``size // 2`` channels before, ``(size - 1) // 2`` after),
    ``y = x * D^-beta`` and ``dx = g * D^-beta - 2*alpha*beta/size * x * sum_window'(g * x *
    D^(-beta-1))`` over the mirrored window."""
    n = size
    D = _channel_window_sum(x * x, n // 2, (n - 1) // 2).mul_(alpha / n).add_(k)
    Db = D.pow(-beta)
    t = g * x * Db / D
    return g * Db - (2 * alpha * beta / n) * x * _channel_window_sum(t, (n - 1) // 2, n // 2)


def _lrn_vjp(step: ChainStep, rec: Recording, rows, g, oy, ox) -> torch.Tensor:
    """True gradient of LRN at the recorded input (LRN mixes channels only, so a window of its
    input is enough)."""
    if step.input_name is None:
        raise NotAChain(f"{step.call.name}: LRN on the model input is not supported")
    full = rec.activations[step.input_name]
    h, w = g.shape[-2:]
    x = gather_window(full.to(g.dtype), rows, oy, ox, h, w)
    m = step.module
    return lrn_vjp(x, g, m.size, m.alpha, m.beta, m.k)


def _linear_vjp(step: ChainStep, g, oy, ox, in_shape) -> torch.Tensor:
    """Transpose of an input-independent linear op (average pooling) on whole maps."""
    out_shape = tuple(step.call.output_shape)
    S = g.shape[0]
    if g.dim() == 4 and (
        tuple(g.shape[-2:]) != tuple(out_shape[-2:]) or bool((oy != 0).any() or (ox != 0).any())
    ):
        g = paste(g, oy, ox, *out_shape[-2:])
    with torch.enable_grad():
        z = torch.zeros(S, *in_shape[1:], dtype=g.dtype, device=g.device, requires_grad=True)
        if step.module is not None:
            y = step.module(z)
        else:
            y = F.adaptive_avg_pool2d(z, tuple(out_shape[-2:]))
        (gz,) = torch.autograd.grad(y, z, g.reshape(y.shape))
    return gz
