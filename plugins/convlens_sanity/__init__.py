"""Built-in convlens probe: can I trust this map? Faithfulness and sanity checks for every map
convlens draws (occlusion, deconvnet, guided backprop, gradient) next to Grad-CAM and Integrated
Gradients from Captum.

    from convlens_sanity import compute_maps, curves, auc, model_blocks, randomised, similarity

* deletion / insertion curves and their areas (Petsiuk et al., RISE, BMVC 2018);
* cascading model-parameter randomisation (Adebayo et al., NeurIPS 2018): Spearman and SSIM of
  each map against the trained model's as blocks are re-initialised from the top;
* image dependence: how alike one map is across different images.

``convlens probe sanity`` runs all three on images and writes ``sanity.json``/``sanity.npz``,
two figures and a report table (see ``docs/probes/sanity.md``).
"""

import convlens

from ._cascade import Block, cascade_plan, model_blocks, randomised, similarity
from ._curves import auc, blurred, curves, endpoints, pixel_order, step_counts
from ._maps import MAP_LABELS, MAPS, MapSettings, compute_maps, normalise
from ._probe import SanityProbe, cross_image_correlation

__all__ = [
    "SanityProbe",
    "MAPS",
    "MAP_LABELS",
    "MapSettings",
    "compute_maps",
    "normalise",
    "curves",
    "endpoints",
    "auc",
    "blurred",
    "pixel_order",
    "step_counts",
    "Block",
    "model_blocks",
    "cascade_plan",
    "randomised",
    "similarity",
    "cross_image_correlation",
]


@convlens.hookimpl
def convlens_register_probes(registry):
    """Register the ``sanity`` probe."""
    registry.register(SanityProbe.name, SanityProbe)
