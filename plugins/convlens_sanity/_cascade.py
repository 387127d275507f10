"""Cascading model-parameter randomisation (Adebayo et al., "Sanity checks for saliency maps",
NeurIPS 2018, Section 3.1), on any ``nn.Module``.

**Blocks.** The model's modules that own parameters are grouped into blocks: a module's block is
its path down to the first module that is not a plain container (``nn.Sequential``,
``nn.ModuleList``, ``nn.ModuleDict``) — a timm stage's blocks, a ResNet bottleneck, a VGG conv,
the classifier. Blocks are ordered by when their first module runs in a forward pass (a traced
call order, not the attribute order).

**Steps.** Step ``s`` of ``S`` re-initialises the top ``round(s · B / S)`` of the ``B`` blocks
(cumulatively, from the output down; the last step re-initialises every block) on a copy of the
model. A module is re-initialised by its own ``reset_parameters()`` (the layer's default init,
BatchNorm's running statistics included) under the seed ``seed + s``; a module without one gets
``N(0, 0.01²)`` weights. The user's model is never touched.

**Similarity.** For each map and image, at each step: SciPy's Spearman rank correlation of the
absolute importance maps (flattened), and scikit-image's SSIM of the maps scaled to ``[0, 1]``
(``|m| / max|m|``, ``data_range = 1``) — the two measures of Adebayo et al.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = ["Block", "model_blocks", "cascade_plan", "randomised", "similarity"]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass(frozen=True)
class Block:
    """A block: its ``name`` (module path) and the names of the modules in it that own
    parameters, in forward order."""

    name: str
    modules: tuple[str, ...]


def _block_name(model: nn.Module, name: str) -> str:
    parts = name.split(".")
    node = model
    for i, p in enumerate(parts):
        node = getattr(node, p)
        if not isinstance(node, _CONTAINERS):
            return ".".join(parts[: i + 1])
    return name


def model_blocks(model: nn.Module, x: torch.Tensor) -> list[Block]:
    """The model's blocks in forward order (one traced forward pass on ``x[:1]``)."""
    owners = [n for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    order: dict[str, int] = {}
    hooks = []

    def hook(name):
        def fn(_m, _inp):
            order.setdefault(name, len(order))

        return fn

    modules = dict(model.named_modules())
    for n in owners:
        hooks.append(modules[n].register_forward_pre_hook(hook(n)))
    try:
        with torch.inference_mode():
            model(x[:1])
    finally:
        for h in hooks:
            h.remove()
    ran = sorted((order[n], n) for n in owners if n in order)
    blocks: dict[str, list[str]] = {}
    first: dict[str, int] = {}
    for k, n in ran:
        b = _block_name(model, n) if n else "(root)"
        blocks.setdefault(b, []).append(n)
        first.setdefault(b, k)
    return [Block(b, tuple(blocks[b])) for b in sorted(blocks, key=first.__getitem__)]


def cascade_plan(blocks: list[Block], steps: int) -> list[list[Block]]:
    """``[step] -> blocks re-initialised at that step`` (cumulative, top down): step ``s`` of
    ``steps`` covers the top ``round(s · B / steps)`` blocks; the last covers all of them."""
    steps = max(1, min(steps, len(blocks)))
    top_down = blocks[::-1]
    return [top_down[: int(round(s * len(blocks) / steps))] for s in range(1, steps + 1)]


def randomised(model: nn.Module, blocks: list[Block], seed: int) -> nn.Module:
    """A copy of ``model`` with every parameter-owning module of ``blocks`` re-initialised
    (``reset_parameters`` under ``torch.manual_seed(seed)``, else ``N(0, 0.01²)``)."""
    twin = copy.deepcopy(model)
    modules = dict(twin.named_modules())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.no_grad():
            for b in blocks:
                for n in b.modules:
                    m = modules[n]
                    if hasattr(m, "reset_parameters"):
                        m.reset_parameters()
                        if hasattr(m, "reset_running_stats"):
                            m.reset_running_stats()
                    else:
                        for p in m.parameters(recurse=False):
                            p.normal_(0.0, 0.01)
    return twin.eval()


def similarity(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """``(spearman, ssim)`` of two importance maps ``[H, W]``: Spearman rank correlation of their
    absolute values (SciPy) and SSIM of ``|m| / max|m|`` (scikit-image, ``data_range = 1``).
    A constant map has no rank order: its Spearman is 0."""
    from scipy.stats import spearmanr
    from skimage.metrics import structural_similarity

    a = np.abs(np.asarray(a, dtype=np.float64))
    b = np.abs(np.asarray(b, dtype=np.float64))
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        rho = 0.0
    else:
        rho = float(spearmanr(a.ravel(), b.ravel()).statistic)
    sa = a / max(a.max(), 1e-30)
    sb = b / max(b.max(), 1e-30)
    return rho, float(structural_similarity(sa, sb, data_range=1.0))
