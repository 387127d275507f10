"""The low-precision fast path of ``--approx``: coarse and drill-down positions in bfloat16.

Krypton's approximations (projective-field truncation, adaptive drill-down; ``_approx.py``) trade
exactness for fewer multiply-adds. On hardware with native bfloat16 matrix units (a CPU with
AMX or AVX512-BF16, a CUDA GPU) the same multiply-adds also run 2–4× faster in bfloat16 than in
float32 (``docs/benchmarks.md``), so ``--approx`` computes its coarse and drill-down positions
with a bfloat16 copy of the model:

* the copy (``convlens.engine.precision.low_precision_copy``: cast to bfloat16, channels-last,
  eval mode) is made once per model and weights and kept by that module, as the deconv rule's
  measurement also uses it; its traced graph (cached per copy like any model's) is the float32
  graph's twin (the float32 graph was checked against the eager model), probed once per call
  with the unoccluded image, whose pass then serves the sweep;
* **bias correction**: bfloat16 rounding shifts the logits of the occluded images and of the
  unoccluded one alike, so each position's logits are those of the copy plus the difference
  between the float32 and the bfloat16 logits of the unoccluded image (the same for the feature
  activity of panel (b)). What remains is the part of the rounding that changes with the
  square's position;
* the check blocks of ``--approx`` are always computed in float32, exactly, so the SSIM a run
  states measures this approximation together with the others.

``auto`` picks bfloat16 only where the hardware runs it natively (elsewhere bfloat16 is emulated
and slower than float32); ``fp32`` turns it off, ``bf16`` forces it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from convlens.engine.precision import DTYPES, PRECISIONS, low_precision_copy, resolve_precision

from ._incremental import IncrementalOcclusion, UnsupportedModel

__all__ = ["PRECISIONS", "resolve_precision", "LowPrecision"]


@dataclass
class LowPrecision:
    """The bfloat16 twin of one occlusion run's incremental engine (module docstring)."""

    format: str
    requested: str
    dtype: torch.dtype
    model: nn.Module | None = None
    engine: IncrementalOcclusion | None = None
    reason: str | None = None
    first: tuple[torch.Tensor, Any] | None = None  # (image, its unoccluded pass) of the probe

    @classmethod
    def build(
        cls,
        model: nn.Module,
        x: torch.Tensor,
        ref: Any,
        full_above: float,
        fold_batchnorm: bool,
        truncate: float,
        fmt: str,
        requested: str,
    ) -> LowPrecision:
        """The copy and its engine for ``ref``'s layer (both cached per model), probed
        with the unoccluded pass of the first image (every op of the graph once: an op with no
        bfloat16 kernel on this device fails here, not in the sweep); on failure an instance with
        ``engine`` None and the ``reason`` (the run then stays in float32)."""
        from ._cache import entry_for

        dtype = DTYPES[fmt]
        try:
            low = low_precision_copy(model, dtype)
        except Exception as exc:  # noqa: BLE001 - any model that cannot be copied
            reason = f"the model cannot be copied ({type(exc).__name__}: {exc})"
            return cls(fmt, requested, dtype, reason=reason)
        low_entry, _ = entry_for(low, x[:1].to(dtype))
        try:
            engine, _, _ = low_entry.engine(
                low, ref.name, ref.call or 0, full_above, fold_batchnorm, truncate
            )
        except UnsupportedModel as exc:
            return cls(fmt, requested, dtype, model=low, reason=str(exc))
        x0 = x[0].to(dtype)
        try:
            cache = engine.cache(x0[None])
            out = cache.values[engine.output_node]
            ok = bool(torch.isfinite(out).all())
        except (RuntimeError, NotImplementedError, TypeError) as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return cls(fmt, requested, dtype, model=low,
                       reason=f"an op of the model has no {fmt} kernel here "
                       f"({type(exc).__name__}: {first_line})")  # fmt: skip
        if not ok:
            return cls(fmt, requested, dtype, model=low,
                       reason=f"the model's logits overflow in {fmt}")  # fmt: skip
        return cls(fmt, requested, dtype, model=low, engine=engine, first=(x0, cache))

    def fast(
        self,
        exact: Callable[..., tuple[torch.Tensor, torch.Tensor]],
        image: torch.Tensor,
        fill: torch.Tensor,
        channel: int,
        logits0: torch.Tensor,
        act0: torch.Tensor,
    ) -> Callable[[Any], tuple[torch.Tensor, torch.Tensor]]:
        """``index -> (logits, feature)`` of the positions ``index`` through the copy, bias
        corrected by the unoccluded image's float32 ``logits0`` ``[1, K]`` and layer output
        ``act0`` (``exact`` is the run's sweep function, given the copy's engine and cache)."""
        assert self.engine is not None
        low_image = image.to(self.dtype)
        if self.first is not None and torch.equal(self.first[0], low_image):
            cache = self.first[1]
        else:
            cache = self.engine.cache(low_image[None])
        low_logits = cache.values[self.engine.output_node].float()
        low_act = cache.values[self.engine.feature_node]
        shift_logits = logits0.float() - low_logits
        shift_feature = float(act0[0, channel].double().sum()) - float(
            low_act[0, channel].double().sum()
        )
        low_fill = fill.to(self.dtype)

        def run(index: Any) -> tuple[torch.Tensor, torch.Tensor]:
            lg, ft = exact(index, eng=self.engine, cache=cache, image=low_image, fill=low_fill)
            return lg + shift_logits, ft + shift_feature

        return run

    def record(self) -> dict[str, Any]:
        used = self.engine is not None
        return {
            "format": self.format if used else "fp32",
            "requested": self.requested,
            "bias_correction": (
                "each position's logits + (float32 - bfloat16 logits of the unoccluded image)"
                if used
                else None
            ),
            "reason": self.reason,
        }
