"""convlens's deconv probe: Zeiler & Fergus's deconvnet (ECCV 2014, Section 2.1, Fig. 1) as a
tool for any PyTorch convnet — projections of chosen activations back to input pixels, top-k
mining over image folders (Fig. 2), feature evolution across checkpoints (Fig. 4) and first-layer
filter diagnostics (Fig. 6).

    from convlens_deconv import project, project_strongest, Seed, mine_topk

    proj = project_strongest(model, x, "conv5", channel=12)        # [N, 3, H, W]
    proj = project(model, x, "blocks.5", seeds, rule="guided")      # deconvnet|guided|gradient
    choice = choose_rule(model, photos, "blocks.5")                # auto: measured, with reason
    top = mine_topk(model, "conv5", "photos/", channels=range(16), k=9)

Registered as the ``deconv`` probe (``convlens probe deconv``) through the ``convlens``
entry-point group, exactly like a third-party plugin. See ``docs/probes/deconv.md``.
"""

from __future__ import annotations

import convlens
from convlens_deconv._chain import (
    ChainPlan,
    build_chain_plan,
    conv_transpose,
    reverse_chain,
    unpool,
)
from convlens_deconv._evolution import evolve, feature_evolution
from convlens_deconv._figures import default_poster_layers
from convlens_deconv._filters import band_energies, filter_diagnostics
from convlens_deconv._general import RECTIFIERS, RULES, DeconvMode
from convlens_deconv._mining import TopK, merge_topk, mine_topk, mine_topk_layers
from convlens_deconv._probe import DeconvProbe
from convlens_deconv._project import (
    Projection,
    Seed,
    choose_method,
    layer_activation,
    project,
    project_strongest,
    strongest_seeds,
)
from convlens_deconv._specificity import (
    RULE_CHOICES,
    SPECIFICITY_THRESHOLD,
    RuleChoice,
    choose_rule,
    image_specificity,
)

__all__ = [
    "project",
    "project_strongest",
    "feature_evolution",
    "evolve",
    "Seed",
    "Projection",
    "choose_method",
    "strongest_seeds",
    "layer_activation",
    "mine_topk",
    "mine_topk_layers",
    "choose_rule",
    "image_specificity",
    "RuleChoice",
    "RULES",
    "RULE_CHOICES",
    "SPECIFICITY_THRESHOLD",
    "merge_topk",
    "TopK",
    "filter_diagnostics",
    "band_energies",
    "unpool",
    "conv_transpose",
    "build_chain_plan",
    "reverse_chain",
    "ChainPlan",
    "DeconvMode",
    "RECTIFIERS",
    "DeconvProbe",
    "default_poster_layers",
    "convlens_register_probes",
]


@convlens.hookimpl
def convlens_register_probes(registry) -> None:
    """Register the ``deconv`` probe."""
    registry.register(DeconvProbe.name, DeconvProbe)
