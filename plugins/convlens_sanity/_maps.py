"""The maps the sanity probe checks: every picture convlens draws for an image and a class, plus the
two baselines people know, taken from Captum.

Each map is reduced to one **importance map** ``[H, W]`` per image (input resolution), the array
the deletion/insertion curves order pixels by and the randomisation cascade compares:

================  ==========================================================================
``occlusion``     Section 4.2: the drop of the class probability when the occlusion probe's
                  square covers a pixel, ``p(x) − p(x with the square)``, averaged over every
                  square position that covers it (the occlusion probe's grid, window and fill).
``deconvnet``     Section 2.1: the class logit projected to pixels with the deconvnet rule
                  (:class:`convlens_deconv.DeconvMode`, ``rule="deconvnet"``), ``Σ_c |·|``.
``guided``        the same with guided backpropagation (``rule="guided"``), ``Σ_c |·|``.
``gradient``      plain autograd of the class logit (``rule="gradient"``), ``Σ_c |·|``.
``gradcam``       Captum ``LayerGradCam`` at the top convolutional layer (ReLU'd), upsampled
                  to the input by ``LayerAttribution.interpolate(…, "bilinear")``.
``ig``            Captum ``IntegratedGradients`` from the fill image (the occlusion fill, by
                  default the dataset mean pixel) in ``ig_steps`` steps, ``Σ_c |·|``.
================  ==========================================================================

Every map is then divided by its largest absolute value and rounded to float16 — the array that
``sanity.npz`` records and every metric is computed on, so that anyone can recompute the numbers
from the file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from convlens.errors import ConvlensError

__all__ = ["MAPS", "MapSettings", "compute_maps", "normalise", "MAP_LABELS"]

#: Map names in the order the tables and figures show them.
MAPS = ("occlusion", "deconvnet", "guided", "gradient", "gradcam", "ig")
MAP_LABELS = {
    "occlusion": "occlusion (p drop)",
    "deconvnet": "deconvnet",
    "guided": "guided backprop",
    "gradient": "gradient",
    "gradcam": "Grad-CAM (Captum)",
    "ig": "Integrated Gradients (Captum)",
    "random": "random order (reference)",
}


@dataclass(frozen=True)
class MapSettings:
    """How the maps are computed: the occlusion square (``window``/``stride`` in input pixels,
    ``fill`` in model input space, one value per channel), the Grad-CAM layer (a module name),
    Integrated Gradients' step count and the batch size of Captum's internal batches."""

    window: int
    stride: int
    fill: tuple[float, ...]
    gradcam_layer: str
    ig_steps: int = 16
    batch_size: int = 32


def normalise(m: torch.Tensor | np.ndarray) -> np.ndarray:
    """``[N, H, W]`` → each map divided by its largest absolute value, as float16 (the recorded
    form; an all-zero map stays zero)."""
    a = torch.as_tensor(m).detach().float().cpu()
    peak = a.abs().flatten(1).amax(1).clamp_min(1e-30)[:, None, None]
    return (a / peak).numpy().astype(np.float16)


def compute_maps(
    model: nn.Module,
    x: torch.Tensor,
    targets: Sequence[int],
    names: Sequence[str],
    settings: MapSettings,
    progress: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray]:
    """``{name: [N, H, W] float16}``: the importance maps ``names`` of ``model`` for the images
    ``x`` (``[N, 3, H, W]``, model input space, on the model's device) and the classes
    ``targets``, normalised as :func:`normalise` says. ``progress(1)`` after each map."""
    unknown = [n for n in names if n not in MAPS]
    if unknown:
        raise ConvlensError(f"map {unknown[0]!r}: expected one of {', '.join(MAPS)}")
    t = torch.as_tensor(list(targets), dtype=torch.long, device=x.device)
    out: dict[str, np.ndarray] = {}
    was_training = model.training
    model.eval()
    try:
        for name in names:
            out[name] = normalise(_COMPUTE[name](model, x, t, settings))
            if progress is not None:
                progress(1)
    finally:
        model.train(was_training)
    return out


# -- the maps ------------------------------------------------------------------------------------


def _rule_map(rule: str) -> Callable[..., torch.Tensor]:
    def compute(model, x, t, settings):
        from convlens_deconv import DeconvMode

        xi = x.detach().clone().requires_grad_(True)
        with torch.enable_grad(), DeconvMode("paper", rule):
            logits = model(xi)
            score = logits.gather(1, t[:, None]).sum()
            (g,) = torch.autograd.grad(score, xi)
        return g.abs().sum(1)

    return compute


def _occlusion(model, x, t, settings: MapSettings) -> torch.Tensor:
    from convlens_occlusion import occlusion_maps
    from convlens_occlusion._grid import masks

    res = occlusion_maps(
        model, x, window=settings.window, stride=settings.stride, fill=settings.fill,
        target=[int(v) for v in t.tolist()],
    )  # fmt: skip
    drop = torch.as_tensor(res.prob_orig[:, None] - res.prob_target.reshape(len(x), -1))
    m = masks(res.grid, np.arange(len(res.grid))).squeeze(1).float()  # [P, H, W]
    cover = m.sum(0).clamp_min(1.0)
    return torch.einsum("np,phw->nhw", drop.float(), m) / cover


def _gradcam(model, x, t, settings: MapSettings) -> torch.Tensor:
    from captum.attr import LayerAttribution, LayerGradCam

    layer = dict(model.named_modules())[settings.gradcam_layer]
    cam = LayerGradCam(model, layer).attribute(x, target=t, relu_attributions=True)
    up = LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), interpolate_mode="bilinear")
    return up.detach().sum(1)


def _ig(model, x, t, settings: MapSettings) -> torch.Tensor:
    from captum.attr import IntegratedGradients

    base = torch.tensor(settings.fill, dtype=x.dtype, device=x.device)[None, :, None, None]
    attr = IntegratedGradients(model).attribute(
        x, baselines=base.expand_as(x), target=t, n_steps=settings.ig_steps,
        internal_batch_size=settings.batch_size,
    )  # fmt: skip
    return attr.detach().abs().sum(1)


_COMPUTE: dict[str, Callable[..., torch.Tensor]] = {
    "occlusion": _occlusion,
    "deconvnet": _rule_map("deconvnet"),
    "guided": _rule_map("guided"),
    "gradient": _rule_map("gradient"),
    "gradcam": _gradcam,
    "ig": _ig,
}
