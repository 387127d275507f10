"""Does a projection show *this* image? The image-specificity figure and the ``auto`` rule.

Below a layer with no max pooling under it, the paper's deconvnet (Section 2.1) sees nothing of
the image: its reverse pass rectifies the signal whatever the forward pass did, and with no
switches to route it the projection of a unit is the same for every image (Mahendran & Vedaldi,
"Salient deconvolutional networks", ECCV 2016). EfficientNet, MobileNet, RegNet and ConvNeXt
have no max pooling; ResNet has one, in its stem.

**image_specificity** of a rule at a layer: the mean cosine similarity between projections of the
*same unit at the same position* seeded on different images,

    mean over units u, over image pairs i < j of  cos(P_u(image_i), P_u(image_j))

with ``P_u`` the projection (``start="one"``: the unit's gradient under the rule, so its scale
does not matter) flattened over the whole input. 1.0 means the picture does not depend on the
image at all; natural photos give values well below 0.5 for a rule that sees the image. The
units: the ``units`` channels whose weakest activation over the images (at the position where it
is strongest) is highest, so that the unit fires in every image; a pair where a projection is
all zero is left out (``pairs`` counts what was averaged). A fully connected layer uses the
channel alone.

**auto** (:func:`choose_rule`): the deconvnet where its figure is at most
:data:`SPECIFICITY_THRESHOLD`; otherwise ``guided`` when it is more image-specific (lower by at
least :data:`MIN_GAIN`); otherwise the deconvnet still (e.g. a unit right after the first
convolution projects to its filter under any rule), with a warning. Every choice carries a
one-line reason and both measured figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from convlens_deconv._project import Seed, forward_for_chain, layer_activation, project

__all__ = [
    "RuleChoice",
    "image_specificity",
    "choose_rule",
    "SPECIFICITY_THRESHOLD",
    "MIN_GAIN",
    "RULE_CHOICES",
]

#: A rule whose figure is above this shows (nearly) the same picture for every image.
SPECIFICITY_THRESHOLD = 0.8
#: ``auto`` switches to ``guided`` only when it lowers the figure by at least this much.
MIN_GAIN = 0.05
#: What ``--rule`` accepts.
RULE_CHOICES = ("auto", "deconvnet", "guided", "gradient")


@dataclass
class RuleChoice:
    """The rule used at ``layer`` and why; ``figures`` holds each measured rule's
    image_specificity (None where no pair of non-zero projections existed)."""

    layer: str
    requested: str
    rule: str
    reason: str
    figures: dict[str, float | None] = field(default_factory=dict)
    pairs: dict[str, int] = field(default_factory=dict)
    units: list[list[int]] = field(default_factory=list)
    images: int = 0
    precision: str = "fp32"

    @property
    def figure(self) -> float | None:
        """The image_specificity of the rule in use."""
        return self.figures.get(self.rule)

    @property
    def warning(self) -> str | None:
        f = self.figure
        if f is None or f <= SPECIFICITY_THRESHOLD:
            return None
        return (
            f"layer {self.layer}: the {self.rule} projections barely depend on the image "
            f"(image_specificity {f:.2f} > {SPECIFICITY_THRESHOLD})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "requested": self.requested,
            "rule": self.rule,
            "reason": self.reason,
            "image_specificity": self.figure,
            "image_specificity_by_rule": dict(self.figures),
            "pairs": dict(self.pairs),
            "units": [list(u) for u in self.units],
            "images": self.images,
            "precision": self.precision,
            "threshold": SPECIFICITY_THRESHOLD,
            "warning": self.warning,
        }


def _units(act: torch.Tensor, n: int) -> list[tuple[int, int, int]]:
    """``(channel, y, x)`` of the ``n`` units that fire most reliably across the images."""
    low = act.float().amin(0)  # the weakest response over the images
    if low.dim() == 1:
        order = torch.argsort(low, descending=True, stable=True)[:n]
        return [(int(c), -1, -1) for c in order]
    c, h, w = low.shape
    best, pos = low.reshape(c, -1).max(-1)
    order = torch.argsort(best, descending=True, stable=True)[:n]
    return [(int(ch), *divmod(int(pos[ch]), w)) for ch in order]


def _mean_cosine(p: torch.Tensor, groups: list[list[int]]) -> tuple[float | None, int]:
    flat = p.reshape(p.shape[0], -1).double()
    norms = flat.norm(dim=1)
    tiny = float(norms.max()) * 1e-9 if len(norms) else 0.0
    sims: list[float] = []
    for idx in groups:
        for a in range(len(idx)):
            for b in range(a + 1, len(idx)):
                i, j = idx[a], idx[b]
                if norms[i] <= tiny or norms[j] <= tiny:
                    continue
                sims.append(float(flat[i] @ flat[j] / (norms[i] * norms[j])))
    if not sims:
        return None, 0
    return sum(sims) / len(sims), len(sims)


def image_specificity(
    model: nn.Module,
    inputs: torch.Tensor,
    layer: str,
    rule: str,
    *,
    units: int = 3,
    mode: str = "paper",
    method: str = "auto",
    act: torch.Tensor | None = None,
    recording: Any = None,
) -> tuple[float | None, int, list[tuple[int, int, int]]]:
    """``(figure, pairs, units)``: the image_specificity of ``rule`` at ``layer`` over the images
    ``inputs`` ``[N, 3, H, W]`` (N >= 2; module docstring). ``act``: ``layer``'s activation on
    ``inputs`` where the caller has it; ``recording``: the chain form's forward pass
    (``forward_for_chain``), read instead of run again."""
    if inputs.shape[0] < 2:
        return None, 0, []
    act = layer_activation(model, inputs, layer) if act is None else act
    chosen = _units(act, units)
    seeds = [Seed(i, c, y, x) for c, y, x in chosen for i in range(inputs.shape[0])]
    res = project(model, inputs, layer, seeds, rule=rule, mode=mode, method=method, start="one",
                  recording=recording)  # fmt: skip
    n = inputs.shape[0]
    groups = [list(range(u * n, (u + 1) * n)) for u in range(len(chosen))]
    fig, pairs = _mean_cosine(res.projections, groups)
    return fig, pairs, chosen


def choose_rule(
    model: nn.Module,
    inputs: torch.Tensor,
    layer: str,
    requested: str = "auto",
    *,
    units: int = 3,
    mode: str = "paper",
    method: str = "auto",
    cache: bool = True,
    precision: str = "auto",
) -> RuleChoice:
    """The rule to project ``layer`` with (``requested`` unless it is ``"auto"``), measured on
    ``inputs`` (a few different photos, preprocessed). See the module docstring.

    The choice is a function of the weights, the layer, the images and the options: with
    ``cache`` it is kept on disk (``_rule_cache.py``, under the convlens cache folder) and read
    back by any later call with the same ones, in this process or another.

    ``precision``: the number format of the measurement (``convlens.engine.precision``):
    ``auto`` measures with a bfloat16 copy of the model where the hardware runs bfloat16
    natively (a figure compared with a threshold does not need float32's digits; 2.8x faster
    on vgg16, no gain on the depthwise convolutions of EfficientNet-Lite0), ``fp32`` always in
    float32. A model with an op that has no bfloat16 kernel,
    or whose bfloat16 figures are not finite, is measured in float32. The projections the probes
    draw are float32 whatever this says (``choice.precision`` records the format used)."""
    from convlens.engine.precision import DTYPES, low_precision_copy, resolve_precision
    from convlens_deconv._rule_cache import load_choice, rule_key, store_choice

    device = next((p.device for p in model.parameters()), inputs.device)
    fmt = resolve_precision(precision, device)
    key = rule_key(model, inputs, layer, requested, units, mode, method, fmt) if cache else None
    if key is not None:
        found = load_choice(key)
        if found is not None:
            return RuleChoice(**found)
    choice = None
    if fmt != "fp32":
        try:
            # the measurement never runs past the layer: the head stays float32, uncopied
            low = low_precision_copy(model, DTYPES[fmt], through=_module_of(model, layer))
            low_inputs = inputs.to(DTYPES[fmt]).contiguous(memory_format=torch.channels_last)
            choice = _choose_rule(low, low_inputs, layer, requested, units=units, mode=mode,
                                  method=method)  # fmt: skip
        except (RuntimeError, NotImplementedError, TypeError):
            choice = None  # an op without a bfloat16 kernel here: measured in float32
        if choice is not None and not all(
            f is None or math.isfinite(f) for f in choice.figures.values()
        ):
            choice = None
        if choice is not None:
            choice.precision = fmt
    if choice is None:
        choice = _choose_rule(
            model, inputs, layer, requested, units=units, mode=mode, method=method
        )
    if key is not None:
        store_choice(key, choice)
    return choice


def _module_of(model: nn.Module, layer: str) -> str | None:
    """The module whose subtree computes ``layer`` (a functional op's parent module; None for
    an op in the root ``forward``: the whole model is then cast)."""
    from convlens.engine import resolve_layer

    return resolve_layer(model, layer).name.split("/")[0] or None


def _choose_rule(
    model: nn.Module,
    inputs: torch.Tensor,
    layer: str,
    requested: str,
    *,
    units: int,
    mode: str,
    method: str,
) -> RuleChoice:
    # one forward pass gives the units' activations and, for the deconvnet in paper mode (the
    # rule measured first), the switches its projections need
    rec = forward_for_chain(model, inputs, layer) if method != "general" else None
    act = rec[layer] if rec is not None else layer_activation(model, inputs, layer)
    n = int(inputs.shape[0])

    def measure(rule: str) -> tuple[float | None, int, list]:
        return image_specificity(
            model, inputs, layer, rule, units=units, mode=mode, method=method, act=act,
            recording=rec if rule == "deconvnet" and mode == "paper" else None,
        )  # fmt: skip

    if requested != "auto":
        f, p, u = measure(requested)
        return RuleChoice(
            layer,
            requested,
            requested,
            "requested",
            {requested: f},
            {requested: p},
            [list(t) for t in u],
            n,
        )
    fd, pd, u = measure("deconvnet")
    figures, pairs = {"deconvnet": fd}, {"deconvnet": pd}
    units_l = [list(t) for t in u]
    if fd is None:
        return RuleChoice(
            layer,
            "auto",
            "deconvnet",
            "image_specificity could not be measured (fewer than 2 images, or no "
            "unit fired); the paper's rule kept",
            figures,
            pairs,
            units_l,
            n,
        )
    if fd <= SPECIFICITY_THRESHOLD:
        return RuleChoice(
            layer,
            "auto",
            "deconvnet",
            f"the paper's deconvnet is image-specific here (image_specificity "
            f"{fd:.2f} <= {SPECIFICITY_THRESHOLD})",
            figures,
            pairs,
            units_l,
            n,
        )
    fg, pg, _ = measure("guided")
    figures["guided"], pairs["guided"] = fg, pg
    if fg is not None and fg <= fd - MIN_GAIN:
        return RuleChoice(
            layer,
            "auto",
            "guided",
            f"the deconvnet's projections are nearly the same for every image "
            f"(image_specificity {fd:.2f} > {SPECIFICITY_THRESHOLD}: no max-pooling "
            f"switches below this layer); guided backprop sees the image "
            f"({fg:.2f})",
            figures,
            pairs,
            units_l,
            n,
        )
    shown = "n/a" if fg is None else f"{fg:.2f}"
    return RuleChoice(
        layer,
        "auto",
        "deconvnet",
        f"no rule is image-specific at this layer (deconvnet {fd:.2f}, guided "
        f"{shown}): a unit this close to the input projects to its filters; the "
        "paper's rule kept",
        figures,
        pairs,
        units_l,
        n,
    )
