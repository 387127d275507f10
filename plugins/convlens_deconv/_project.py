"""Projecting chosen activations to pixel space: seeds in, projections out (Section 2.1).

Both forms of the deconvnet sit behind one call, :func:`project`:

* ``method="chain"``: the literal walk of :mod:`convlens_deconv._chain` (zfnet, alexnet, VGG);
* ``method="general"``: the modified backward pass of :mod:`convlens_deconv._general` (any net);
* ``method="auto"`` (default): the chain walk where the layers up to the target form a chain of
  supported layers, else the general form; the result records which ran and why.

**What the numbers are.** ``start="activation"`` (default, the paper's form): the chosen unit's
rectified activation value ``max(a, 0)`` is fed down, so a unit that did not fire projects to zero
and projections of strong units are large. ``start="one"`` feeds 1, as Captum's
``NeuronDeconvolution`` does (the gradient of the unit, with deconvnet rules). On a net of ReLUs,
max pooling and linear ops the two differ exactly by the positive factor ``a`` (every rule is
positively homogeneous); for ``a <= 0`` the paper's form is zero.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from convlens.engine import ReceptiveField, resolve_layer
from convlens.errors import ConvlensError
from convlens_deconv._chain import ChainPlan, NotAChain, build_chain_plan, reverse_chain
from convlens_deconv._forward import recorded_forward, trace_to
from convlens_deconv._general import MODES, RULES, DeconvMode

__all__ = [
    "Seed",
    "Projection",
    "project",
    "project_strongest",
    "strongest_seeds",
    "choose_method",
    "METHODS",
    "STARTS",
    "RULES",
]

METHODS = ("auto", "chain", "general")
#: Bytes of windows one reverse pass of the chain form may hold (sets the default seed batch).
WINDOW_BUDGET = 512 * 2**20
STARTS = ("activation", "one")


@dataclass(frozen=True)
class Seed:
    """One activation to project: row ``image`` of the inputs, ``channel``, and the position
    ``(y, x)`` in the layer's map (``-1`` for a layer without spatial layout, e.g. fc6)."""

    image: int
    channel: int
    y: int = -1
    x: int = -1


@dataclass
class Projection:
    """Projections ``[S, C, H, W]`` (input space, same shape as an input image) of ``seeds`` at
    ``layer``; ``activations`` ``[S]`` are the units' raw values; ``method`` is the form that ran
    (``chain``/``general``) and ``reason`` why the chain form was not used under ``auto``."""

    layer: str
    seeds: list[Seed]
    projections: torch.Tensor
    activations: torch.Tensor
    method: str
    mode: str
    start: str
    reason: str | None = None
    modified_ops: dict[str, int] = field(default_factory=dict)
    receptive_field: ReceptiveField | None = None
    rule: str = "deconvnet"

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "rule": self.rule,
            "method": self.method,
            "mode": self.mode,
            "start": self.start,
            "reason": self.reason,
            "modified_ops": dict(self.modified_ops),
        }


def _check(inputs: torch.Tensor, mode: str, start: str, method: str, rule: str) -> None:
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4:
        raise ConvlensError(f"inputs: expected a [N, C, H, W] tensor, got {_shape(inputs)}")
    if rule not in RULES:
        raise ConvlensError(f"rule {rule!r}: expected one of {', '.join(RULES)}")
    if mode not in MODES:
        raise ConvlensError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
    if start not in STARTS:
        raise ConvlensError(f"start {start!r}: expected one of {', '.join(STARTS)}")
    if method not in METHODS:
        raise ConvlensError(f"method {method!r}: expected one of {', '.join(METHODS)}")


def _shape(x: Any) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


def choose_method(
    model: nn.Module,
    inputs: torch.Tensor,
    layer: str,
    mode: str = "paper",
    method: str = "auto",
    rule: str = "deconvnet",
) -> tuple[str, ChainPlan | None, str | None]:
    """``(method, chain plan or None, reason)``: which form projects ``layer`` of ``model``.

    Traces one forward pass on ``inputs[:1]`` up to ``layer``. ``method="chain"`` on a net that is
    not a chain raises :class:`~convlens.errors.ConvlensError` with the reason."""
    return _choose(model, inputs, layer, mode, method, rule)[:3]


#: Up to this many images, :func:`project` (deconvnet, paper mode) makes one pass for the chain's
#: plan and its switches instead of a traced pass of one image and another of all of them.
SHARED_PASS_IMAGES = 4


def _choose(model, inputs, layer, mode, method, rule="deconvnet", recording=None):
    resolve_layer(model, layer)  # a misspelt layer fails here, with close matches
    if recording is not None and recording.trace:  # a recording with its trace: plan from it
        rec = recording
    else:
        rec = trace_to(model, inputs[:1], layer)  # the trace up to the layer is all a plan needs
    rf = rec.rf(layer)
    if method == "general":
        return "general", None, "requested", rf
    try:
        plan = build_chain_plan(model, rec, layer, mode, rule)
    except NotAChain as exc:
        if method == "chain":
            raise ConvlensError(
                f"layer {layer!r}: the chain deconvnet does not apply: {exc}"
            ) from None
        return "general", None, str(exc), rf
    return "chain", plan, None, rf


def _seed_tensors(seeds: Sequence[Seed], device) -> tuple[torch.Tensor, ...]:
    t = torch.tensor([[s.image, s.channel, s.y, s.x] for s in seeds], dtype=torch.long)
    t = t.to(device)
    return t[:, 0], t[:, 1], t[:, 2], t[:, 3]


def _values_at(act: torch.Tensor, rows, ch, ys, xs) -> torch.Tensor:
    if act.dim() == 4:
        return act[rows, ch, ys, xs]
    if act.dim() == 2:
        return act[rows, ch]
    raise ConvlensError(
        f"layer output of shape {tuple(act.shape)}: expected [N, C, H, W] or [N, F]"
    )


def _validate_seeds(seeds: Sequence[Seed], act_shape: tuple[int, ...], n: int, layer: str) -> None:
    for s in seeds:
        if not 0 <= s.image < n:
            raise ConvlensError(f"seed {s}: image index out of range 0..{n - 1}")
        if not 0 <= s.channel < act_shape[1]:
            raise ConvlensError(f"seed {s}: layer {layer!r} has {act_shape[1]} channels")
        if len(act_shape) == 4 and not (0 <= s.y < act_shape[2] and 0 <= s.x < act_shape[3]):
            raise ConvlensError(
                f"seed {s}: position outside layer {layer!r}'s {act_shape[2]}x{act_shape[3]} map"
            )


def _start_values(raw: torch.Tensor, start: str) -> torch.Tensor:
    return raw.clamp(min=0) if start == "activation" else torch.ones_like(raw)


def _by_image(seeds: Sequence[Seed]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(seeds):
        groups[s.image].append(i)
    return dict(sorted(groups.items()))


def _chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def project(
    model: nn.Module,
    inputs: torch.Tensor,
    layer: str,
    seeds: Sequence[Seed],
    *,
    method: str = "auto",
    mode: str = "paper",
    start: str = "activation",
    rule: str = "deconvnet",
    image_batch: int = 16,
    seed_batch: int | None = None,
    progress: Callable[[int], None] | None = None,
    recording: Any = None,
) -> Projection:
    """Project each seed's activation at ``layer`` down to input pixels (Section 2.1).

    ``inputs`` ``[N, C, H, W]``: preprocessed images on the model's device; seeds index into it.
    ``rule``: the backward rule at rectifiers — ``"deconvnet"`` (the paper), ``"guided"`` or
    ``"gradient"`` (:mod:`convlens_deconv._general`; ``"gradient"`` implies ``mode="captum"``).
    ``mode``: ``"paper"`` skips contrast normalisation, ``"captum"`` back-propagates through it.
    ``start``: ``"activation"`` (the paper: the unit's rectified value) or ``"one"`` (Captum).
    ``image_batch``: images per forward pass; ``seed_batch``: projections per reverse pass of the
    chain form (default: as many as fit ``WINDOW_BUDGET`` bytes of windows, at most 48).
    ``progress(n)`` is called as projections complete.
    ``recording``: an eval-mode recording of this very ``inputs`` batch stopped at ``layer``,
    with its switches and the layers the chain reads (:func:`forward_for_chain`); the chain form
    then reads it instead of running the forward pass again (``image_specificity`` records once
    for its units and its projections). Ignored by the general form, and where it lacks a layer.
    Returns a :class:`Projection` with ``projections`` ``[len(seeds), C, H, W]``.
    """
    _check(inputs, mode, start, method, rule)
    if rule == "gradient":
        mode = "captum"
    seeds = list(seeds)
    if not seeds:
        raise ConvlensError("project: no seeds given")
    if (
        recording is None and method != "general" and rule == "deconvnet" and mode == "paper"
        and inputs.shape[0] <= SHARED_PASS_IMAGES
    ):  # fmt: skip
        # a few images: one pass gives the plan's trace and the chain's switches (a fallback to
        # the general form then wastes a pass of these few images instead of one)
        resolve_layer(model, layer)  # a misspelt layer fails here, with close matches
        recording = forward_for_chain(model, inputs, layer)
    chosen, plan, reason, rf = _choose(model, inputs, layer, mode, method, rule, recording)
    if chosen == "chain":
        if seed_batch is None:
            per_seed = 3 * 4 * plan.window_elements()  # a window and two temporaries, float32
            seed_batch = int(max(1, min(48, WINDOW_BUDGET // per_seed)))
        proj, raw = _project_chain(
            model,
            inputs,
            layer,
            seeds,
            plan,
            mode,
            start,
            image_batch,
            seed_batch,
            progress or _no_progress,
            rule,
            recording,
        )
        ops: dict[str, int] = {}
    else:
        proj, raw, ops = _project_general(
            model, inputs, layer, seeds, mode, start, image_batch, progress or _no_progress, rule
        )
    return Projection(
        layer,
        seeds,
        proj,
        raw,
        chosen,
        mode,
        start,
        reason if chosen == "general" else None,
        ops,
        rf,
        rule,
    )


def _no_progress(n: int) -> None:
    return None


def _project_chain(
    model,
    inputs,
    layer,
    seeds,
    plan: ChainPlan,
    mode,
    start,
    image_batch,
    seed_batch,
    progress,
    rule="deconvnet",
    recording=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.zeros(len(seeds), *inputs.shape[1:], dtype=inputs.dtype, device=inputs.device)
    raw_all = torch.zeros(len(seeds), dtype=inputs.dtype, device=inputs.device)
    extra = list(plan.lrn_inputs) if mode == "captum" else []
    if rule != "deconvnet":
        extra += plan.rectifier_inputs
    functional = any("/" in n for n in [layer, *extra])
    groups = _by_image(seeds)
    if recording is not None and not _holds(recording, [layer, *extra], inputs.shape[0]):
        recording = None
    if recording is not None:  # one chunk of every image, rows as in ``inputs``
        groups = {img: groups.get(img, []) for img in range(inputs.shape[0])}
        image_batch = max(image_batch, inputs.shape[0])
    was_training = model.training
    model.eval()
    try:
        for imgs in _chunks(list(groups), image_batch):
            row_of = {img: r for r, img in enumerate(imgs)}
            with torch.no_grad():
                rec = recording or recorded_forward(
                    model,
                    inputs[imgs],
                    [layer, *extra],
                    layer,
                    switches=True,
                    trace=False,
                    functional=functional,
                )
                act = rec[layer]
                idx = [i for img in imgs for i in groups[img]]
                _validate_seeds([seeds[i] for i in idx], tuple(act.shape), len(inputs), layer)
                cache: dict = {}
                for part in _chunks(idx, seed_batch):
                    sub = [seeds[i] for i in part]
                    _, ch, ys, xs = _seed_tensors(sub, act.device)
                    rows = torch.tensor([row_of[s.image] for s in sub], device=act.device)
                    raw = _values_at(act, rows, ch, ys, xs)
                    proj = reverse_chain(
                        plan, rec, rows, ch, ys, xs, _start_values(raw, start), mode, cache, rule
                    )
                    pos = torch.tensor(part, device=out.device)
                    out[pos] = proj.to(out.dtype)
                    raw_all[pos] = raw.to(raw_all.dtype)
                    progress(len(part))
    finally:
        model.train(was_training)
    return out, raw_all


def forward_for_chain(model: nn.Module, inputs: torch.Tensor, layer: str):
    """One eval-mode pass of ``inputs`` stopped at ``layer`` that serves the whole chain form of
    the deconvnet rule in paper mode: ``layer``'s activation, the switches below it and the
    trace (functional ops included) the chain's plan is built from. For callers that also need
    the activation: pass it back as ``project(..., recording=...)``; :func:`project` makes it
    itself for at most :data:`SHARED_PASS_IMAGES` images."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return recorded_forward(
                model, inputs, [layer], layer, switches=True, trace=True, functional=True
            )
    finally:
        model.train(was_training)


def _holds(rec, layers: Sequence[str], n: int) -> bool:
    """Whether ``rec`` recorded every one of ``layers`` for ``n`` images, with switches."""
    try:
        return all(rec[name].shape[0] == n for name in layers) and rec.passes == 1
    except ConvlensError:
        return False


def _project_general(
    model, inputs, layer, seeds, mode, start, image_batch, progress, rule="deconvnet"
):
    out = torch.zeros(len(seeds), *inputs.shape[1:], dtype=inputs.dtype, device=inputs.device)
    raw_all = torch.zeros(len(seeds), dtype=inputs.dtype, device=inputs.device)
    functional = "/" in layer
    groups = _by_image(seeds)
    ops: dict[str, int] = {}
    was_training = model.training
    model.eval()
    try:
        for imgs in _chunks(list(groups), image_batch):
            x = inputs[imgs].detach().clone().requires_grad_(True)
            deconv = DeconvMode(mode, rule)
            with torch.enable_grad():
                rec = recorded_forward(
                    model,
                    x,
                    [layer],
                    layer,
                    extra_modes=[deconv],
                    switches=False,
                    trace=False,
                    functional=functional,
                    detach=False,
                )
                act = rec[layer]
                idx = [i for img in imgs for i in groups[img]]
                _validate_seeds([seeds[i] for i in idx], tuple(act.shape), len(inputs), layer)
                rounds = max(len(groups[img]) for img in imgs)
                for r in range(rounds):
                    sel = [
                        (row, groups[img][r])
                        for row, img in enumerate(imgs)
                        if r < len(groups[img])
                    ]
                    rows = torch.tensor([row for row, _ in sel], device=act.device)
                    part = [i for _, i in sel]
                    _, ch, ys, xs = _seed_tensors([seeds[i] for i in part], act.device)
                    raw = _values_at(act.detach(), rows, ch, ys, xs)
                    grad_out = torch.zeros_like(act)
                    if act.dim() == 4:
                        grad_out[rows, ch, ys, xs] = _start_values(raw, start)
                    else:
                        grad_out[rows, ch] = _start_values(raw, start)
                    (gx,) = torch.autograd.grad(act, x, grad_out, retain_graph=r < rounds - 1)
                    pos = torch.tensor(part, device=out.device)
                    out[pos] = gx[rows].detach().to(out.dtype)
                    raw_all[pos] = raw.to(raw_all.dtype)
                    progress(len(part))
            if not ops:  # the ops one forward pass modified (the same in every pass)
                ops = dict(deconv.seen)
    finally:
        model.train(was_training)
    return out, raw_all, ops


def strongest_seeds(act: torch.Tensor, channel: int | None = None) -> list[Seed]:
    """For each image of an activation ``[N, C, H, W]`` (or ``[N, F]``): the seed of its
    strongest value in ``channel`` (or over all channels when None). Ties: the first position in
    row-major order."""
    spatial = act.dim() == 4
    a = act if spatial else act[:, :, None, None]
    n, c, h, w = a.shape
    seeds = []
    for i in range(n):
        if channel is None:
            ch, pos = divmod(int(a[i].reshape(-1).argmax()), h * w)
        else:
            ch, pos = channel, int(a[i, channel].reshape(-1).argmax())
        y, x = divmod(pos, w)
        seeds.append(Seed(i, int(ch), int(y) if spatial else -1, int(x) if spatial else -1))
    return seeds


def layer_activation(model: nn.Module, inputs: torch.Tensor, layer: str) -> torch.Tensor:
    """The activation of ``layer`` on ``inputs`` (one inference-mode forward pass)."""
    with torch.inference_mode():
        rec = recorded_forward(model, inputs, [layer], layer, switches=False, trace=False)
    return rec[layer].clone()


def project_strongest(
    model: nn.Module, inputs: torch.Tensor, layer: str, channel: int, **kwargs: Any
) -> torch.Tensor:
    """For each image of ``inputs`` ``[N, 3, H, W]`` (preprocessed, on the model's device): the
    paper-form deconvnet projection of the strongest activation of ``channel`` at ``layer``,
    ``[N, 3, H, W]`` (Section 2.1; Fig. 7(c) shows these). ``kwargs`` go to :func:`project`."""
    act = layer_activation(model, inputs, layer)
    if not 0 <= channel < act.shape[1]:
        raise ConvlensError(f"channel {channel}: layer {layer!r} has {act.shape[1]} channels")
    seeds = strongest_seeds(act, channel)
    return project(model, inputs, layer, seeds, **kwargs).projections
