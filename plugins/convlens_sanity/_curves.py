"""Deletion and insertion curves (Petsiuk, Das & Saenko, "RISE", BMVC 2018), batched.

For an image ``x``, its class ``t`` and an importance map ``m`` (``[H, W]``, input resolution):

* **pixel order**: pixels sorted by ``m`` descending; ties broken by the pixel's row-major index
  (a stable sort of ``−m``), so the order is deterministic;
* **steps**: ``N`` steps; after step ``k`` (``k = 0 … N``) the first ``round(k · H·W / N)``
  pixels of the order are changed (all three channels);
* **deletion**: changed pixels take the removal value — the occlusion probe's fill (by default
  the dataset mean pixel, ``0`` in model input space); **insertion**: the curve starts from a
  blurred copy of the image (Gaussian, ``σ = 5 px`` at 224, scaled with the input's shorter side,
  kernel ``2·⌈2σ⌉ + 1``) and changed pixels take their original values;
* each point is the softmax probability of ``t``; the **area under the curve** is the trapezoid
  rule over the fraction of pixels changed (``x = k / N`` from 0 to 1).

A good map makes the deletion curve fall fast (low AUC) and the insertion curve rise fast (high
AUC). The inner ``N − 1`` inputs of all images for one map and one curve go through the model as
one batch (cut into ``batch_size`` chunks only to bound memory), not one forward per step; the first
and last points (the image, the fill everywhere, the blurred image) do not depend on the map and
are computed once for all maps (:func:`endpoints`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

__all__ = [
    "pixel_order",
    "step_counts",
    "curve_inputs",
    "curves",
    "endpoints",
    "auc",
    "blurred",
    "blur_sigma",
]


def pixel_order(m: np.ndarray) -> np.ndarray:
    """``[N, H·W]``: pixel indices of each map ``[N, H, W]`` from most to least important, ties
    by row-major index."""
    flat = np.asarray(m, dtype=np.float32).reshape(len(m), -1)
    return np.argsort(-flat, axis=1, kind="stable")


def step_counts(n_pixels: int, steps: int) -> np.ndarray:
    """``[steps + 1]``: pixels changed after each step (0 … n_pixels)."""
    return np.round(np.arange(steps + 1) * n_pixels / steps).astype(np.int64)


def blur_sigma(height: int, width: int) -> float:
    """The insertion start's blur: 5 px at 224, proportional to the shorter side."""
    return 5.0 * min(height, width) / 224.0


def blurred(x: torch.Tensor) -> torch.Tensor:
    """The insertion curve's start: ``x`` (``[N, C, H, W]``) blurred by a Gaussian of
    :func:`blur_sigma` (reflect padding, torchvision's ``gaussian_blur``)."""
    from torchvision.transforms.functional import gaussian_blur

    sigma = blur_sigma(int(x.shape[-2]), int(x.shape[-1]))
    k = 2 * int(np.ceil(2 * sigma)) + 1
    return gaussian_blur(x, [k, k], [sigma, sigma])


def curve_inputs(
    x: torch.Tensor,
    order: torch.Tensor,
    counts: torch.Tensor,
    base: torch.Tensor,
    source: torch.Tensor,
) -> torch.Tensor:
    """``[N, K, C, H, W]``: for each image and step, ``base`` with the first ``counts[k]`` pixels
    of ``order`` taken from ``source`` (deletion: base = image, source = fill; insertion: base =
    blurred image, source = image)."""
    n, c, h, w = x.shape
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(h * w, device=order.device).expand(n, -1))
    changed = rank[:, None, :] < counts[None, :, None]  # [N, K, HW]
    changed = changed.view(n, len(counts), 1, h, w)
    return torch.where(changed, source[:, None], base[:, None])


def _probs(model, batch, t, batch_size) -> torch.Tensor:
    """p(t[i]) for each row of ``batch`` (``t`` per row), in ``batch_size`` chunks."""
    out = []
    for i in range(0, len(batch), batch_size):
        chunk = batch[i : i + batch_size]
        if chunk.device.type == "cpu":  # CPU convolutions run faster on channels-last input
            chunk = chunk.contiguous(memory_format=torch.channels_last)
        p = torch.softmax(model(chunk).float(), dim=1)
        out.append(p.gather(1, t[i : i + batch_size, None])[:, 0])
    return torch.cat(out)


@torch.inference_mode()
def endpoints(
    model: nn.Module,
    x: torch.Tensor,
    targets: Sequence[int],
    fill: Sequence[float],
    start: torch.Tensor,
    batch_size: int = 16,
) -> torch.Tensor:
    """``[3, N]``: p(target) of the image, of the fill everywhere and of the insertion start —
    every curve's first and last point whatever the map (computed once, shared by all maps)."""
    n = len(x)
    fill_t = torch.as_tensor(list(fill), dtype=x.dtype, device=x.device)[None, :, None, None]
    t = torch.as_tensor(list(targets), dtype=torch.long, device=x.device)
    batch = torch.cat([x, fill_t.expand_as(x), start])
    return _probs(model, batch, t.repeat(3), batch_size).view(3, n)


@torch.inference_mode()
def curves(
    model: nn.Module,
    x: torch.Tensor,
    maps: np.ndarray,
    targets: Sequence[int],
    fill: Sequence[float],
    steps: int,
    batch_size: int = 16,
    start: torch.Tensor | None = None,
    kinds: Sequence[str] = ("deletion", "insertion"),
    ends: torch.Tensor | None = None,
) -> dict[str, np.ndarray]:
    """``{"deletion": [N, steps + 1], "insertion": [N, steps + 1]}``: p(target) along the
    curves ``kinds`` of one map ``[N, H, W]`` for the images ``x`` ``[N, C, H, W]`` (model input
    space). ``start``: the insertion start (default :func:`blurred` ``(x)``); ``ends``: the
    shared first and last points (:func:`endpoints`; computed here when not given). Only the
    ``steps − 1`` inner points of each curve depend on the map: those go through the model."""
    n, c, h, w = x.shape
    dev = x.device
    order = torch.as_tensor(pixel_order(maps), device=dev)
    inner = torch.as_tensor(step_counts(h * w, steps)[1:-1], device=dev)
    fill_t = torch.as_tensor(list(fill), dtype=x.dtype, device=dev)[None, :, None, None]
    start = blurred(x) if start is None else start
    if ends is None:
        ends = endpoints(model, x, targets, fill, start, batch_size)
    t = torch.as_tensor(list(targets), dtype=torch.long, device=dev)
    t_rows = t.repeat_interleave(len(inner))
    out = {}
    for kind, base, source, first, last in (
        ("deletion", x, fill_t.expand_as(x), ends[0], ends[1]),
        ("insertion", start, x, ends[2], ends[0]),
    ):
        if kind not in kinds:
            continue
        batch = curve_inputs(x, order, inner, base, source).reshape(-1, c, h, w)
        mid = _probs(model, batch, t_rows, batch_size).view(n, len(inner))
        full = torch.cat([first[:, None], mid, last[:, None]], dim=1)
        out[kind] = full.cpu().numpy()
    return out


def auc(curve: np.ndarray) -> np.ndarray:
    """Trapezoid area of curves ``[..., steps + 1]`` over x = 0 … 1 in equal steps."""
    c = np.asarray(curve, dtype=np.float64)
    steps = c.shape[-1] - 1
    return (c[..., 1:] + c[..., :-1]).sum(-1) / (2.0 * steps)
