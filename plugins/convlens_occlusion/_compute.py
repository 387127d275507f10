"""The occlusion sweep of Zeiler & Fergus 2014, Section 4.2 / Fig. 7, as a function.

For each image and each position of a grey square: the probability of the correct class (Fig. 7
(d)), the most probable class ((e)) and the total activity of one feature map of one layer ((b)),
all read from the same forward passes. Two paths compute them: ``incremental`` (only the changed
region of each layer is recomputed, see ``_incremental.py``) and ``batched`` (positions painted into
full copies of the image and run through the model in batches). ``auto`` takes the incremental path
and falls back to the batched one, saying why, when the model's graph or the chosen layer is not
supported.
"""

from __future__ import annotations

import contextlib
import functools
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from convlens.engine import record, resolve_layer, top_conv_layer, trace_model
from convlens.errors import ConvlensError

from ._approx import CHECK, COARSE, DRILL, DRILL_BF16, TRUNCATE, SubGrid, approximate_image
from ._cache import entry_for
from ._flops import flop_report
from ._grid import OcclusionGrid, default_window, fill_tensor, paint
from ._incremental import (
    Geom,
    IncrementalOcclusion,
    UnsupportedModel,
    _node_label,
    check_truncate,
)
from ._precision import PRECISIONS, LowPrecision, resolve_precision

__all__ = [
    "OcclusionMaps",
    "occlusion_maps",
    "flop_analysis",
    "METHODS",
    "OcclusionFallbackWarning",
    "OcclusionApproxWarning",
]

METHODS = ("auto", "incremental", "batched")
#: Memory the positions of one batch may use (activations), to size batches automatically.
BATCH_BYTES = 1 << 30
#: Largest single tensor of a batch on the incremental path (see ``_incremental_batch``).
TENSOR_BYTES = 24 << 20
MIN_BATCH = 8
MAX_BATCH = 256


class OcclusionFallbackWarning(UserWarning):
    """``method="auto"`` could not take the incremental path and used batched forwards."""


class OcclusionApproxWarning(UserWarning):
    """An approximate map (``approx=True``) missed its target SSIM on the exact check block."""


@dataclass
class OcclusionMaps:
    """Result of :func:`occlusion_maps`. Maps are ``[N, rows, cols]`` over the grid's positions.

    ``prob_target``: softmax probability of ``targets[n]`` with the square at each position (Fig.
    7 (d)); ``logit_target``: its logit; ``top_class``: the most probable class ((e));
    ``feature_activity``: the spatial sum of channel ``channels[n]`` of ``layer`` ((b));
    ``logits``: every logit ``[N, rows, cols, K]`` when asked for. ``*_orig``: the same numbers for
    the unoccluded image. ``strongest_at``: ``[N, 2]`` (row, column) in ``layer``'s map where
    channel ``channels[n]`` is largest in the unoccluded image (panel (c) projects that unit).
    ``path``: which computation ran, per image, and per layer for the incremental path.
    """

    grid: OcclusionGrid
    fill: tuple[float, ...]
    layer: str
    layer_module: str
    targets: np.ndarray
    target_source: str
    channels: np.ndarray
    channel_source: str
    prob_target: np.ndarray
    logit_target: np.ndarray
    top_class: np.ndarray
    feature_activity: np.ndarray
    prob_orig: np.ndarray
    logit_orig: np.ndarray
    top1_orig: np.ndarray
    feature_orig: np.ndarray
    num_classes: int = 0
    path: dict[str, Any] = field(default_factory=dict)
    logits: np.ndarray | None = None
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    strongest_at: np.ndarray | None = None


class _Phases:
    """Wall-clock seconds of each phase of a call (``default_layer``, ``trace``, ``validate``,
    ``unoccluded``, ``sweep``; ``other`` is the rest of ``total``), and which fixed costs came
    from the per-model cache (``cached``)."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self.cached: dict[str, bool] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0

    def seconds(self, total: float) -> dict[str, float]:
        out = {k: round(v, 4) for k, v in self.times.items()}
        out["other"] = round(max(0.0, total - sum(self.times.values())), 4)
        out["total"] = round(total, 4)
        return out


#: Mean multiply-adds per convolution/linear layer and position above which the sweep keeps
#: torch's thread count without a one-thread trial (``_ThreadTuner.skip_if_heavy``).
HEAVY_OP_MACS = 50e6


class _ThreadTuner:
    """Intra-op threads for the sweep's batches. The incremental path runs many small ops, which
    lose to threading overhead when the cores are shared (OpenMP threads then wait for each other):
    with ``threads=None`` on CPU, the first three batches run with torch's thread count, one
    thread, and torch's count again; the faster of the last two sets the rest. Values do not
    depend on the choice beyond float rounding."""

    def __init__(
        self, threads: int | None, device: torch.device, earlier: dict[str, Any] | None = None
    ) -> None:
        self.initial = torch.get_num_threads()
        self.explicit = int(threads) if threads else None
        self.choice = int(threads) if threads else self.initial
        tune = threads is None and device.type == "cpu" and self.initial > 1
        # an earlier call's choice for this model and input size (``_cache.py``), made with
        # the same starting thread count
        self.cached = bool(tune and earlier and earlier.get("initial") == self.initial)
        if self.cached:
            self.choice = int(earlier["threads"])
            tune = False
        self.schedule = [self.initial, 1, self.initial] if tune else []
        self.tuned = tune
        self.times: dict[int, float] = {}
        self.skipped: str | None = None

    def skip_if_heavy(self, flops: dict[str, Any] | None) -> None:
        """No trial where the planned work is heavy: convolutions averaging at least
        :data:`HEAVY_OP_MACS` multiply-adds per position keep every thread busy (vgg16 at 224:
        165 M), and the one-thread trial batch would only cost time (0.3 s there)."""
        if not self.schedule or len(self.schedule) < 3 or not flops or not flops.get("layers"):
            return
        per_op = float(flops.get("macs_executed", 0)) / len(flops["layers"])
        if per_op >= HEAVY_OP_MACS:
            self.schedule = []
            self.skipped = f"{per_op / 1e6:.0f} M multiply-adds per layer and position"

    @contextlib.contextmanager
    def batch(self, positions: int) -> Iterator[None]:
        if not self.schedule:
            torch.set_num_threads(self.choice)
            yield
            return
        threads = self.schedule.pop(0)
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        yield
        if len(self.schedule) < 2:  # the first batch warms up; the next two are compared
            self.times[threads] = (time.perf_counter() - t0) / max(1, positions)
        if not self.schedule:
            self.choice = min(self.times, key=self.times.get)

    def restore(self) -> None:
        torch.set_num_threads(self.initial)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "threads": self.choice,
            "tuned_seconds_per_position": {str(k): round(v, 5) for k, v in self.times.items()},
        }
        if self.tuned:
            out["initial"] = self.initial
        if self.skipped:
            out["trial_skipped"] = self.skipped
        if self.cached:
            out["cached"] = True
        return out


def _as_int_list(value: int | Sequence[int] | None, n: int, what: str) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, (int, np.integer)):
        return [int(value)] * n
    out = [int(v) for v in value]
    if len(out) != n:
        raise ConvlensError(f"occlusion {what}: {len(out)} values for {n} images")
    return out


def _auto_batch(per_position_numel: int, positions: int) -> int:
    per = max(1, per_position_numel) * 4 * 3  # float32, input + output + one temporary
    return int(max(1, min(MAX_BATCH, positions, BATCH_BYTES // per)))


def occlusion_maps(
    model: nn.Module,
    inputs: torch.Tensor,
    *,
    window: int | None = None,
    stride: int | None = None,
    fill: float | Sequence[float] = 0.0,
    target: int | Sequence[int] | None = None,
    layer: str | None = None,
    channel: int | Sequence[int] | None = None,
    method: str = "auto",
    batch_size: int | None = None,
    full_above: float = 0.7,
    fold_batchnorm: bool = True,
    threads: int | None = None,
    return_logits: bool = False,
    progress: Callable[[int], None] | None = None,
    approx: bool = False,
    approx_coarse: int = COARSE,
    approx_drill: float | None = None,
    approx_ssim: float = 0.9,
    approx_seed: int = 0,
    approx_check: float = CHECK,
    approx_truncate: float = TRUNCATE,
    approx_precision: str = "auto",
    group_positions: int = 4,
) -> OcclusionMaps:
    """Slide a square over every image of ``inputs`` (``[N, 3, H, W]``, model input space) and
    record the classifier's and one feature map's response at each position (Section 4.2, Fig. 7).

    ``window``/``stride``: square side and step in input pixels (default 32 / 8 at 224, scaled
    with the input size). ``fill``: the square's value in model input space, one number or one
    per channel (0 = the normalisation mean, i.e. the dataset mean pixel). ``target``: class(es)
    whose probability is mapped (default: each image's unoccluded top-1). ``layer``/``channel``:
    the feature map of (b) (default: the top convolutional layer and, per image, its channel with
    the largest activation). ``method``: ``auto``, ``incremental`` or ``batched``.
    ``batch_size``: positions per forward (default: by memory: the incremental path keeps its
    largest tensor within 24 MiB, the batched path its activations within ~1 GiB).
    ``full_above``: the incremental path runs a layer in full once the changed region would cover
    more than this fraction of its map. ``fold_batchnorm``: the incremental path folds each
    eval-mode BatchNorm into the convolution that alone feeds it (one pass instead of two; equal
    to float rounding). ``threads``: intra-op threads during the sweep (default: torch's
    setting or one thread, whichever runs the first batches faster; see ``path["threads"]``).
    ``group_positions``: the incremental path sweeps positions in up to this many groups per
    axis, by the size of the box they change in each layer (border positions and those aligned
    with a stride change less), each group with patches of its own largest box (1: one patch
    size for all positions).
    ``approx``: Krypton's adaptive drill-down (``_approx.py``): exact values on every
    ``approx_coarse``-th row and column of positions, interpolation between them, exact values
    again where the target's probability changes most (``approx_drill`` of the positions), and
    the SSIM of the predicted map against exact values on random 7 × 7 blocks of positions
    (``approx_seed``; about ``approx_check`` of the positions; the worst block counts), checked
    against ``approx_ssim`` (``path["approx"]``; a miss warns with
    :class:`OcclusionApproxWarning`). ``approx_truncate``: on the incremental path the coarse and
    drill-down positions run with Krypton's projective-field truncation at this threshold τ
    (each layer's changed box capped at ``⌈τ·H⌉`` × ``⌈τ·W⌉`` of its map; 1: exact); the check
    blocks always run exactly. ``approx_precision``: the number format of the coarse and
    drill-down positions on the incremental path: ``fp32``, ``bf16`` (a bfloat16 copy of the
    model, each position's logits corrected by the copy's error on the unoccluded image; see
    :func:`low_precision_copy`) or ``auto`` (bf16 where the hardware runs it natively: a CUDA
    device with bfloat16, or a CPU with AVX512-BF16/AMX; fp32 elsewhere); the check blocks are
    always float32 and exact, so the stated SSIM covers this approximation too.
    """
    if method not in METHODS:
        raise ConvlensError(f"occlusion method {method!r}: choose one of {', '.join(METHODS)}")
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4:
        raise ConvlensError("occlusion inputs: expected a [N, C, H, W] tensor")
    if approx and (approx_coarse < 2
                   or (approx_drill is not None and not 0.0 <= approx_drill <= 1.0)
                   or not 0.0 < approx_ssim <= 1.0):  # fmt: skip
        raise ConvlensError(
            "occlusion approx: coarse must be at least 2, drill in [0, 1], ssim in (0, 1]"
        )
    approx_truncate = check_truncate(approx_truncate)
    if approx_precision not in PRECISIONS:
        raise ConvlensError(
            f"occlusion approx precision {approx_precision!r}: choose one of "
            + ", ".join(PRECISIONS)
        )
    if batch_size is not None and batch_size < 1:
        raise ConvlensError(f"occlusion batch_size {batch_size}: must be at least 1")
    if model.training:
        warnings.warn(
            f"occlusion: {type(model).__name__} is in training mode (dropout, batch statistics): "
            "call model.eval() for reproducible maps",
            stacklevel=2,
        )
    t0 = time.perf_counter()
    n_img, _, height, width = inputs.shape
    device = next((p.device for p in model.parameters()), inputs.device)
    x = inputs.to(device)
    grid = OcclusionGrid(
        int(height), int(width),
        int(window) if window is not None else default_window(min(height, width)),
        int(stride) if stride is not None else default_window(min(height, width), 8),
    )  # fmt: skip
    fill_t = fill_tensor(fill, x[0])
    advance = progress or (lambda k=1: None)
    phases = _Phases()
    targets_given = _as_int_list(target, n_img, "target")
    channels_given = _as_int_list(channel, n_img, "channel")

    with torch.inference_mode():
        entry, _ = entry_for(model, x)
        with phases("default_layer"):
            if layer:
                layer_name = layer
            else:
                phases.cached["default_layer"] = entry.default_layer is not None
                if entry.default_layer is None:
                    entry.default_layer = _default_layer(model, x[:1], entry)
                layer_name = entry.default_layer
            ref = resolve_layer(model, layer_name)

        engine: IncrementalOcclusion | None = None
        reason: str | None = None
        first_cache = None
        if method != "batched":
            with phases("trace"):
                try:
                    engine, ekey, phases.cached["trace"] = entry.engine(
                        model, ref.name, ref.call or 0, full_above, fold_batchnorm
                    )
                except UnsupportedModel as exc:
                    if method == "incremental":
                        raise
                    reason = str(exc)
            if engine is not None:
                phases.cached["validate"] = ekey in entry.validated
            if engine is not None and ekey not in entry.validated:
                # once per model and input size: the graph must reproduce the eager model (its
                # unoccluded pass of the first image is kept as that image's cache)
                with phases("validate"):
                    try:
                        known = entry.trace_output
                        if (
                            engine.feature_is_leaf and known is not None
                            and known[0].shape == x[:1].shape and torch.equal(known[0], x[:1])
                        ):  # fmt: skip
                            # the default layer's trace already ran the eager model on this
                            # image; a leaf module's node runs that very module
                            logits_e, act_e = known[1], None
                        else:
                            logits_e, act_e = _eager_pass(model, x[:1], layer_name, ref)
                        first_cache = engine.cache(x[:1])
                        _validate(engine, first_cache, logits_e, act_e, layer_name)
                        entry.validated.add(ekey)
                    except UnsupportedModel as exc:
                        entry.reject(ekey, exc)
                        if method == "incremental":
                            raise
                        reason = str(exc)
                        engine, first_cache = None, None

        fast_engine: IncrementalOcclusion | None = None
        low: LowPrecision | None = None
        precision = "fp32"
        if approx and engine is not None:
            precision = resolve_precision(approx_precision, device)
        if precision != "fp32":
            with phases("trace"):
                low = LowPrecision.build(
                    model, x, ref, full_above, fold_batchnorm, approx_truncate, precision,
                    approx_precision,
                )  # fmt: skip
            if low.engine is None:  # no copy or no trace of it: fp32, and the record says why
                precision = "fp32"
        if (
            approx and engine is not None and approx_truncate < 1.0
            and (low is None or low.engine is None)
        ):  # fmt: skip
            # the same traced graph (and unoccluded pass) with projective-field truncation
            with phases("trace"):
                fast_engine, _, _ = entry.engine(
                    model, ref.name, ref.call or 0, full_above, fold_batchnorm, approx_truncate
                )

        eager_logits = eager_act = None
        if engine is None:
            with phases("unoccluded"):
                eager_logits, eager_act = _eager_pass(model, x, layer_name, ref)
            if batch_size is None and entry.max_numel is None:
                with phases("default_layer"):
                    entry.max_numel = _max_activation_numel(model, x[:1])

        positions = len(grid)
        flops: dict[str, Any] | None = None
        groups: list[np.ndarray] | None = None
        approx_records: list[dict[str, Any]] = []
        num_classes: int | None = None
        logits_all: torch.Tensor | None = None
        feature_all = torch.empty((n_img, positions), dtype=torch.float64)
        logits0_rows: list[torch.Tensor] = []
        feature_orig: list[float] = []
        strongest: list[list[int]] = []
        targets: list[int] = []
        channels: list[int] = []
        per_image: list[str] = []
        layout: list[str] = []
        layers_report: list[dict] = []
        batches: list[int] = []
        tuners = {
            m: _ThreadTuner(threads, device, entry.threads.get(m))
            for m in ("incremental", "batched")
        }
        # the whole grid's positions, of every group and image, meet in one tail (``_Tail``)
        shared_tail: _Tail | None = None
        try:
            for i in range(n_img):
                cache = None
                if engine is not None:
                    with phases("unoccluded"):
                        cache = first_cache if i == 0 and first_cache is not None else None
                        cache = cache or engine.cache(x[i : i + 1])
                    lg0 = cache.values[engine.output_node]
                    ac0 = cache.values[engine.feature_node]
                else:
                    lg0, ac0 = eager_logits[i : i + 1], eager_act[i : i + 1]
                if num_classes is None:
                    num_classes = int(lg0.shape[1])
                    logits_all = torch.empty((n_img, positions, num_classes), dtype=torch.float32)
                t_i = targets_given[i] if targets_given is not None else int(lg0.argmax(1))
                if not 0 <= t_i < num_classes:
                    raise ConvlensError(
                        f"occlusion target {t_i}: the model has {num_classes} classes"
                    )
                if channels_given is not None:
                    c_i = channels_given[i]
                else:
                    c_i = int(ac0.flatten(2).amax(2).argmax(1))
                if not 0 <= c_i < ac0.shape[1]:
                    raise ConvlensError(
                        f"occlusion channel {c_i}: layer {layer_name!r} has {ac0.shape[1]} channels"
                    )
                targets.append(t_i)
                channels.append(c_i)
                logits0_rows.append(lg0.float().cpu())
                feature_orig.append(float(ac0[0, c_i].double().sum()))
                flat = int(ac0[0, c_i].reshape(-1).argmax()) if ac0.dim() == 4 else 0
                strongest.append(list(divmod(flat, int(ac0.shape[-1]))))
                if groups is None and engine is not None and cache is not None:
                    with phases("plan"):
                        flops, groups = _plan_groups(
                            engine, cache, grid, x.device, group_positions, layers_report
                        )
                        plans = [
                            engine.plan(cache, _input_geom(SubGrid(grid, g), x.device))
                            for g in groups
                        ]
                        shared_tail = _tail_for(
                            engine, cache, plans,
                            tuners["incremental"].explicit or tuners["incremental"].initial,
                        )  # fmt: skip
                        tuners["incremental"].skip_if_heavy(flops)

                per_batch: list[int] = [0]

                def exact(
                    index, i=i, c_i=c_i, cache=cache, lg_out=None, ft_out=None,
                    num_classes=num_classes, per_batch=per_batch, groups=groups, eng=None,
                    shared=shared_tail, image=None, fill=fill_t,
                ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
                    image = x[i] if image is None else image
                    sub = grid if index is None else SubGrid(grid, index)
                    n = len(sub)
                    lg_out = torch.empty((n, num_classes)) if lg_out is None else lg_out
                    ft_out = torch.empty(n, dtype=torch.float64) if ft_out is None else ft_out
                    if index is None and engine is not None and cache is not None:
                        # positions in groups whose changed boxes have similar sizes; the rows
                        # land in ``lg_out``/``ft_out`` when ``shared_tail`` is flushed
                        for g in groups or [np.arange(len(grid))]:
                            bs = _sweep_incremental(
                                engine, cache, image, SubGrid(grid, g), fill, c_i, batch_size,
                                lg_out, ft_out, advance, layers_report, tuners["incremental"],
                                tail=shared, out_rows=torch.as_tensor(g),
                            )  # fmt: skip
                            per_batch[:] = [bs]
                        return lg_out, ft_out
                    if (
                        index is not None and groups and len(groups) > 1
                        and engine is not None and cache is not None
                    ):  # fmt: skip
                        # some positions (``--approx``): split along the same groups, whose
                        # rows meet in one tail, flushed before returning
                        e = eng or engine
                        parts = [np.flatnonzero(np.isin(index, g)) for g in groups]
                        parts = [w for w in parts if len(w)]
                        subs = [SubGrid(grid, index[w]) for w in parts]
                        plans = [e.plan(cache, _input_geom(sg, x.device)) for sg in subs]
                        tail = _tail_for(
                            e, cache, plans,
                            tuners["incremental"].explicit or tuners["incremental"].initial,
                        )  # fmt: skip
                        for w, sg in zip(parts, subs, strict=True):
                            bs = _sweep_incremental(
                                e, cache, image, sg, fill, c_i, batch_size, lg_out, ft_out,
                                advance, layers_report, tuners["incremental"], tail=tail,
                                out_rows=torch.as_tensor(w),
                            )  # fmt: skip
                            per_batch[:] = [bs]
                        if tail is not None:
                            tail.flush()
                        return lg_out, ft_out
                    if engine is not None and cache is not None:
                        bs = _sweep_incremental(
                            eng or engine, cache, image, sub, fill, c_i, batch_size, lg_out,
                            ft_out,
                            advance, layers_report, tuners["incremental"],
                        )  # fmt: skip
                        per_batch[:] = [bs]
                    else:
                        bs = batch_size or _auto_batch(entry.max_numel or 1, n)
                        _sweep_batched(
                            model, x[i], sub, fill_t, layer_name, ref.is_function, c_i, bs,
                            lg_out, ft_out, advance, layout, tuners["batched"],
                        )  # fmt: skip
                        per_batch[:] = [bs]
                    return lg_out, ft_out

                with phases("sweep"):
                    if approx:
                        fast = None
                        if fast_engine is not None and cache is not None:
                            fast = functools.partial(exact, eng=fast_engine)
                        if low is not None and low.engine is not None and cache is not None:
                            fast = low.fast(exact, x[i], fill_t, c_i, lg0, ac0)
                        lg_i, ft_i, rec = approximate_image(
                            grid, exact, t_i, coarse=approx_coarse,
                            drill=(approx_drill if approx_drill is not None
                                   else DRILL_BF16 if low is not None and low.engine is not None
                                   else DRILL),
                            quality=approx_ssim, seed=approx_seed + i, check=approx_check,
                            fast=fast, truncate=approx_truncate,
                        )  # fmt: skip
                        rec["precision"] = low.record() if low is not None else {
                            "format": "fp32", "requested": approx_precision,
                            "bias_correction": None,
                            "reason": None if approx_precision == "fp32" else (
                                "no native bfloat16 on this device"
                                if engine is not None else "not on the incremental path"
                            ),
                        }  # fmt: skip
                        logits_all[i], feature_all[i] = lg_i, ft_i
                        approx_records.append(rec)
                    else:
                        exact(None, lg_out=logits_all[i], ft_out=feature_all[i])
                per_image.append("incremental" if engine is not None else "batched")
                b = per_batch[0]
                del cache
                batches.append(b)
            if shared_tail is not None:
                with phases("sweep"):
                    shared_tail.flush()
        finally:
            for tuner in tuners.values():
                tuner.restore()
        for m in set(per_image):
            if tuners[m].tuned:
                entry.threads[m] = tuners[m].to_dict()
        if threads is None and device.type == "cpu":
            phases.cached["threads"] = all(tuners[m].cached for m in set(per_image))

    approx_path = None
    if approx:
        misses = [k for k, r in enumerate(approx_records) if not r["meets_target"]]
        approx_path = {"meets_target": not misses, "per_image": approx_records}
        if misses:
            figs = ", ".join(str(approx_records[k]["check"]["ssim"]) for k in misses)
            warnings.warn(
                f"occlusion approx: the approximate map of image(s) {misses} misses the target "
                f"SSIM {approx_ssim} on its exact check block ({figs}): not a good approximation;"
                " lower --approx-coarse, raise --approx-drill or --approx-truncate, use"
                " --approx-precision fp32, or run exact",
                OcclusionApproxWarning,
                stacklevel=2,
            )
    if reason is not None and method == "auto":
        warnings.warn(
            f"occlusion: incremental inference not used ({reason}); ran batched forwards",
            OcclusionFallbackWarning,
            stacklevel=2,
        )
    shape = (n_img, grid.rows, grid.cols)
    logits0 = torch.cat(logits0_rows)
    logits_d = logits_all.double()
    tgt = torch.as_tensor(targets)
    prob = logits_d.softmax(2).gather(2, tgt.view(-1, 1, 1).expand(n_img, positions, 1))[..., 0]
    logit_t = logits_d.gather(2, tgt.view(-1, 1, 1).expand(n_img, positions, 1))[..., 0]
    idx = torch.arange(n_img)
    probs0 = logits0.double().softmax(1)
    methods_run = sorted(set(per_image))
    path = {
        "method": methods_run[0] if len(methods_run) == 1 else "mixed",
        "requested": method,
        "per_image": per_image,
        "fallback_reason": reason,
        "full_above": full_above,
        "batch_size": batches[0] if len(set(batches)) == 1 else batches,
        "opaque_modules": list(engine.opaque) if engine is not None else [],
        "batched_layout": layout[0] if layout else None,
        "threads": {m: tuners[m].to_dict() for m in sorted(set(per_image))},
        "folded_batchnorms": engine._plan.folded if engine and engine._plan else 0,
        "layers": layers_report,
        "cached": dict(phases.cached),
        "flops": flops,
        "tail": None
        if shared_tail is None
        else {
            "from_node": _node_label(engine.nodes[shared_tail.t]),
            "batch": shared_tail.capacity,
            "runs": shared_tail.flushes,
            "seconds": round(shared_tail.seconds, 4),
        },
        "approx": approx_path,
    }
    return OcclusionMaps(
        grid=grid,
        fill=tuple(float(v) for v in fill_t.flatten().tolist()),
        layer=layer_name,
        layer_module=ref.key,
        targets=np.asarray(targets, dtype=np.int64),
        target_source="given" if targets_given is not None else "top-1 of the unoccluded image",
        channels=np.asarray(channels, dtype=np.int64),
        channel_source="given" if channels_given is not None else "strongest activation",
        prob_target=prob.reshape(shape).float().numpy(),
        logit_target=logit_t.reshape(shape).float().numpy(),
        top_class=logits_all.argmax(2).reshape(shape).numpy().astype(np.int64),
        feature_activity=feature_all.reshape(shape).numpy(),
        prob_orig=probs0[idx, tgt].float().numpy(),
        logit_orig=logits0[idx, tgt].numpy(),
        top1_orig=logits0.argmax(1).numpy().astype(np.int64),
        feature_orig=np.asarray(feature_orig, dtype=np.float64),
        num_classes=int(num_classes),
        path=path,
        logits=logits_all.reshape(*shape, num_classes).numpy() if return_logits else None,
        seconds=time.perf_counter() - t0,
        phases=phases.seconds(time.perf_counter() - t0),
        strongest_at=np.asarray(strongest, dtype=np.int64).reshape(n_img, 2),
    )


def _plan_groups(engine, cache, grid, device, per_axis: int, layers_report: list[dict]):
    """The multiply-add report (``_flops.py``) and the groups of positions of the sweep.

    Positions whose changed boxes have the same size in every layer can share one patch size
    without computing more than they change; one patch size for the whole grid (the largest box)
    makes border positions, and positions aligned with a stride, compute more. The rows of the
    grid are grouped by the sizes of their boxes' vertical extents in every convolution (which
    depend on the row alone), merged greedily — the merge that adds the fewest multiply-adds
    first — down to ``per_axis`` groups; the same for columns; a group of positions is a row
    group times a column group."""
    full_plan = engine.plan(cache, _input_geom(grid, device))
    if not layers_report:
        layers_report.extend(r.to_dict() for r in full_plan.report)
    report = flop_report(engine, cache, full_plan, grid.boxes())
    flops = report.to_dict()
    rows, cols = grid.shape
    groups = [np.arange(len(grid))]
    if per_axis > 1 and report.extents:
        per = np.array([e[0] for e in report.extents])
        ey = np.stack([e[1] for e in report.extents], 1).reshape(rows, cols, -1)
        ex = np.stack([e[2] for e in report.extents], 1).reshape(rows, cols, -1)
        if (ey == ey[:, :1]).all() and (ex == ex[:1]).all():
            row_groups = _merge(ey[:, 0], ex[0].max(0), per, per_axis)
            col_groups = _merge(ex[0], ey[:, 0].max(0), per, per_axis)
            groups = [
                (r[:, None] * cols + c[None, :]).reshape(-1) for r in row_groups for c in col_groups
            ]
    if len(groups) > 1:
        executed = 0.0
        for g in groups:
            sub = SubGrid(grid, g)
            plan = engine.plan(cache, _input_geom(sub, device))
            executed += len(g) * flop_report(engine, cache, plan, sub.boxes()).executed
        executed /= len(grid)
        flops["macs_executed"] = round(executed)
        flops["planned"] = round(report.full / max(executed, 1e-30), 3)
    flops["groups"] = len(groups)
    return flops, groups


def _merge(sizes: np.ndarray, other: np.ndarray, per: np.ndarray, k: int) -> list[np.ndarray]:
    """Indices along one axis (``sizes[i]``: the extent of each layer's box at index ``i``)
    grouped by equal sizes, then merged pairwise (cheapest merge first, a group then computes the
    larger extent of the two) until ``k`` groups remain. ``other``: the other axis's largest
    extents, ``per``: multiply-adds per unit, to weigh a merge's cost."""
    found: dict[tuple, list[int]] = {}
    for i, s in enumerate(sizes):
        found.setdefault(tuple(int(v) for v in s), []).append(i)
    gs = [(np.array(s, dtype=np.float64), idx) for s, idx in found.items()]
    weight = per * other

    def cost(s, n):
        return n * float((weight * s).sum())

    while len(gs) > k:
        best = None
        for a in range(len(gs)):
            for b in range(a + 1, len(gs)):
                (sa, ia), (sb, ib) = gs[a], gs[b]
                extra = cost(np.maximum(sa, sb), len(ia) + len(ib)) - cost(sa, len(ia))
                extra -= cost(sb, len(ib))
                if best is None or extra < best[0]:
                    best = (extra, a, b)
        _, a, b = best
        gs[a] = (np.maximum(gs[a][0], gs[b][0]), gs[a][1] + gs[b][1])
        del gs[b]
    return [np.asarray(sorted(idx), dtype=np.int64) for _, idx in gs]


def flop_analysis(
    model: nn.Module,
    x: torch.Tensor,
    *,
    window: int | None = None,
    stride: int | None = None,
    layer: str | None = None,
    full_above: float = 0.7,
    group_positions: int = 4,
) -> dict[str, Any]:
    """Krypton's theoretical bound and the incremental plan's multiply-adds for ``model`` on
    the image ``x`` (``[1, C, H, W]``) without running the sweep (``_flops.py``); the same
    numbers :func:`occlusion_maps` writes to ``path["flops"]``."""
    _, _, height, width = x.shape
    grid = OcclusionGrid(
        int(height), int(width),
        int(window) if window is not None else default_window(min(height, width)),
        int(stride) if stride is not None else default_window(min(height, width), 8),
    )  # fmt: skip
    with torch.inference_mode():
        entry, _ = entry_for(model, x)
        if layer is None:
            entry.default_layer = entry.default_layer or _default_layer(model, x[:1])
            layer = entry.default_layer
        ref = resolve_layer(model, layer)
        engine, _, _ = entry.engine(model, ref.name, ref.call or 0, full_above, True)
        cache = engine.cache(x[:1])
        flops, _ = _plan_groups(engine, cache, grid, x.device, group_positions, [])
        return flops


def _incremental_batch(plan, cache, positions: int, stop: int | None = None) -> int:
    """Positions per batch on the incremental path: as many as keep its largest tensor (a
    patch, a gathered window or a full map) within :data:`TENSOR_BYTES`. Larger tensors are
    mapped and unmapped by the allocator at every batch, which costs more than it saves.
    ``stop``: the runs end at that node (a tail split); later nodes do not count."""
    worst = 1
    for k, (n, (action, extra)) in enumerate(plan.actions.items()):
        if stop is not None and k >= stop:
            break
        v = cache.values.get(n)
        if not isinstance(v, torch.Tensor) or v.dim() != 4:
            continue
        g = plan.geoms.get(n)
        if g is not None:
            worst = max(worst, v.shape[1] * g.h * g.w)
        elif action in ("run", "run_folded", "run_linear"):
            worst = max(worst, int(np.prod(v.shape[1:])))
        if action == "local" and g is not None:
            win = extra[0]
            hw = (g.h - 1) * win.stride[0] + win.dilation[0] * (win.kernel[0] - 1) + 1
            ww = (g.w - 1) * win.stride[1] + win.dilation[1] * (win.kernel[1] - 1) + 1
            worst = max(worst, cache.values[n.args[0]].shape[1] * hw * ww)
    return int(max(1, min(MAX_BATCH, positions, max(MIN_BATCH, TENSOR_BYTES // (4 * worst)))))


def _default_layer(model: nn.Module, x1: torch.Tensor, entry=None) -> str:
    """The top convolutional layer (Fig. 7 reads layer 5 of the paper's model)."""
    aliases = getattr(model, "convlens_aliases", {}) or {}
    if any(a.startswith("conv") and a[4:].isdigit() for a in aliases):
        return top_conv_layer(model)
    return top_conv_layer(model, entry.trace(model, x1) if entry else trace_model(model, x1))


def _max_activation_numel(model: nn.Module, x1: torch.Tensor) -> int:
    """Largest per-image tensor the input or any traced layer call produces (to size batches),
    from the engine's trace of one forward pass."""
    shapes = [tuple(x1.shape)] + [c.output_shape for c in trace_model(model, x1).trace]
    return max(int(np.prod(s[1:])) for s in shapes if s)


def _eager_pass(model: nn.Module, x: torch.Tensor, layer_name: str, ref) -> tuple:
    """Logits and the layer's activation of the eager model, 16 images at a time."""
    outs, acts = [], []
    with record(
        model, [layer_name], switches=False, trace=False, functional=ref.is_function
    ) as rec:
        for start in range(0, x.shape[0], 16):
            out = model(x[start : start + 16])
            if not isinstance(out, torch.Tensor) or out.dim() != 2:
                raise ConvlensError(
                    f"{type(model).__name__}: output is not a [N, classes] tensor of logits"
                )
            outs.append(out)
            acts.append(rec[layer_name])
    logits, act = torch.cat(outs), torch.cat(acts)
    if act.dim() != 4:
        raise ConvlensError(
            f"layer {layer_name!r}: output shape {tuple(act.shape)} is not a feature map "
            "[N, C, H, W]"
        )
    return logits, act


def _validate(engine: IncrementalOcclusion, cache, logits0, act0, layer_name: str) -> None:
    """The traced graph must reproduce the eager model on the unoccluded image."""
    out = cache.values[engine.output_node]
    if not isinstance(out, torch.Tensor) or out.shape != logits0.shape:
        raise UnsupportedModel("the traced graph's output differs in shape from the model's")
    if not _close(out, logits0):
        raise UnsupportedModel("the traced graph's logits differ from the eager model's")
    feat = cache.values.get(engine.feature_node)
    if act0 is None:  # a leaf module's own node: its output is the module's, on the graph's input
        if not isinstance(feat, torch.Tensor) or feat.dim() != 4:
            raise UnsupportedModel(
                f"layer {layer_name!r}: its output is not a feature map [N, C, H, W]"
            )
        return
    if not isinstance(feat, torch.Tensor) or feat.shape != act0.shape or not _close(feat, act0):
        raise UnsupportedModel(
            f"layer {layer_name!r}: no node of the traced graph reproduces its output"
        )


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> bool:
    scale = float(b.abs().max()) or 1.0
    return float((a.float() - b.float()).abs().max()) <= tol * scale


def _input_geom(grid: OcclusionGrid, device) -> Geom:
    y0, x0 = grid.starts()
    k = grid.window
    oy = torch.as_tensor(np.minimum(y0, grid.height - k), device=device)
    ox = torch.as_tensor(np.minimum(x0, grid.width - k), device=device)
    return Geom(k, k, oy, ox, grid.height, grid.width)


def _input_patches(
    image: torch.Tensor, grid: OcclusionGrid, geom: Geom, sl: slice, fill: torch.Tensor
) -> torch.Tensor:
    """The painted input box of each position of ``sl``: ``[B, C, k, k]``."""
    k = geom.h
    oy, ox = geom.oy[sl], geom.ox[sl]
    ar = torch.arange(k, device=image.device)
    ys = oy[:, None] + ar
    xs = ox[:, None] + ar
    crop = image[:, ys[:, :, None], xs[:, None, :]].permute(1, 0, 2, 3)  # [B, C, k, k]
    boxes = torch.as_tensor(grid.boxes()[sl], device=image.device)
    in_y = (ys >= boxes[:, 1:2]) & (ys < boxes[:, 3:4])
    in_x = (xs >= boxes[:, 0:1]) & (xs < boxes[:, 2:3])
    mask = (in_y[:, :, None] & in_x[:, None, :]).unsqueeze(1)
    return torch.where(mask, fill, crop)


class _Tail:
    """Positions waiting for the tail of the network (``IncrementalOcclusion.tail_start``: the
    nodes that run in full for every position, e.g. vgg16's fully connected layers).

    Positions arrive in batches as small as their group of positions (a border row of squares
    may be a handful of positions), and a fully connected layer read by a small batch is bound by
    reading its weights (vgg16's first one: 411 MB per call). The head of each batch runs on
    patches as before; its values at the split wait here and run through the tail together,
    ``capacity`` rows at a time, across groups and images, then land in the rows they came from
    (``flush``; the caller flushes before reading its outputs). Values are equal to a per-batch
    run up to float rounding."""

    def __init__(self, engine, plan, t: int, capacity: int, threads: int | None) -> None:
        self.engine, self.plan, self.t = engine, plan, t
        self.capacity = max(1, int(capacity))
        self.threads = threads
        self.pending: list[tuple] = []
        self.rows = 0
        self.image = None  # an ImageCache: weights and constants, the same for every image
        self.flushes = 0
        self.seconds = 0.0

    def add(self, image, state, channel: int, feature, logits_out, feature_out, rows) -> None:
        self.image = image
        self.pending.append((state, channel, feature, logits_out, feature_out, rows))
        self.rows += int(rows.numel())
        if self.rows >= self.capacity:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        t0 = time.perf_counter()
        before = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            nodes = self.engine.tail_inputs(self.t)
            state = {n: torch.cat([p[0][n] for p in self.pending]) for n in nodes}
            channels = torch.cat([
                torch.full((int(p[5].numel()),), p[1], dtype=torch.long) for p in self.pending
            ])  # fmt: skip
            logits, feat = self.engine.run_tail(self.image, self.plan, self.t, state, channels)
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
                raise ConvlensError("occlusion: the model's output is not a [N, classes] tensor")
            logits = logits.float().cpu()
            start = 0
            for _, _, head_feature, lg_out, ft_out, rows in self.pending:
                stop = start + int(rows.numel())
                lg_out[rows] = logits[start:stop]
                ft_out[rows] = (head_feature if head_feature is not None
                                else feat[start:stop]).cpu()  # fmt: skip
                start = stop
        finally:
            torch.set_num_threads(before)
        self.pending, self.rows = [], 0
        self.flushes += 1
        self.seconds += time.perf_counter() - t0


def _tail_for(engine, cache, plans, threads: int | None) -> _Tail | None:
    """A :class:`_Tail` for the positions of ``plans`` (the groups of one grid), split where
    all of them run in full; None when there is no such split."""
    if engine._shapes is None:
        engine.note_shapes(cache.values)
    starts = [engine.tail_start(p) for p in plans]
    if not starts or any(t is None for t in starts):
        return None
    t = max(starts)
    if not all(engine.tail_ok(p, t) for p in plans):
        return None
    worst = 1
    for n in engine.nodes[t:] + engine.tail_inputs(t):
        v = cache.values.get(n)
        if isinstance(v, torch.Tensor) and engine._dep[n]:
            worst = max(worst, int(v[0].numel()))
    capacity = max(MIN_BATCH, min(MAX_BATCH, TENSOR_BYTES // (4 * worst)))
    return _Tail(engine, plans[0], t, capacity, threads)


def _sweep_incremental(
    engine,
    cache,
    image,
    grid,
    fill,
    channel,
    batch_size,
    logits_out,
    feature_out,
    advance,
    layers_report,
    tuner: _ThreadTuner,
    tail: _Tail | None = None,
    out_rows: torch.Tensor | None = None,
) -> int:
    """The positions of ``grid`` (an :class:`OcclusionGrid` or :class:`SubGrid`) on patches,
    into ``logits_out``/``feature_out``. With ``tail`` the runs stop at its split and the rows
    wait there (the caller flushes it); without, a tail of this call's own is used and flushed
    before returning. ``out_rows``: the row of the outputs each position of ``grid`` fills
    (default: its own index)."""
    geom = _input_geom(grid, image.device)
    plan = engine.plan(cache, geom)
    if not layers_report:
        layers_report.extend(r.to_dict() for r in plan.report)
    positions = len(grid)
    own = tail is None
    if own:
        tail = _tail_for(engine, cache, [plan], tuner.explicit or tuner.initial)
    elif not engine.tail_ok(plan, tail.t):
        tail.flush()
        tail, own = None, True
    stop = tail.t if tail is not None else None
    rows_of = torch.arange(positions) if out_rows is None else out_rows
    if batch_size is None:
        batch_size = _incremental_batch(plan, cache, positions, stop)
    for start in range(0, positions, batch_size):
        sl = slice(start, min(positions, start + batch_size))
        with tuner.batch(sl.stop - sl.start):
            patch = _input_patches(image, grid, geom, sl, fill)
            out, feat = engine.run(cache, plan, patch, sl, channel, stop=stop)
        rows = rows_of[sl]
        if tail is not None:
            tail.add(cache, out, channel, feat, logits_out, feature_out, rows)
        else:
            if not isinstance(out, torch.Tensor) or out.dim() != 2:
                raise ConvlensError("occlusion: the model's output is not a [N, classes] tensor")
            logits_out[rows] = out.float().cpu()
            feature_out[rows] = feat.cpu()
        advance(sl.stop - sl.start)
    if own and tail is not None:
        tail.flush()
    return batch_size


def _sweep_batched(
    model,
    image,
    grid,
    fill,
    layer_name,
    functional,
    channel,
    batch_size,
    logits_out,
    feature_out,
    advance,
    layout: list[str],
    tuner: _ThreadTuner,
) -> None:
    """Painted copies through the model, ``batch_size`` at a time, in channels-last memory
    (faster convolutions on CPU) unless the model rejects it (``x.view`` on a feature map), then
    contiguous. ``layout`` receives the one used."""
    positions = len(grid)
    channels_last = not layout or layout[0] == "channels_last"
    with record(model, [layer_name], switches=False, trace=False, functional=functional) as rec:
        for start in range(0, positions, batch_size):
            sl = slice(start, min(positions, start + batch_size))
            with tuner.batch(sl.stop - sl.start):
                batch = paint(image, grid, np.arange(sl.start, sl.stop), fill)
                if channels_last:
                    try:
                        logits = model(batch.contiguous(memory_format=torch.channels_last))
                    except RuntimeError:
                        channels_last = False  # same values either way: only the layout changes
                if not channels_last:
                    logits = model(batch)
            logits_out[sl] = logits.float().cpu()
            feature_out[sl] = rec[layer_name][:, channel].double().sum((1, 2)).cpu()
            advance(sl.stop - sl.start)
    layout[:] = ["channels_last" if channels_last else "contiguous"]
