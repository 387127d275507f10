"""Built-in convlens probe: occlusion sensitivity (Zeiler & Fergus 2014, Section 4.2, Fig. 7).

    from convlens_occlusion import occlusion_maps
    maps = occlusion_maps(model, x, window=32, stride=8)      # x: [N, 3, H, W] model inputs
    maps.prob_target, maps.top_class, maps.feature_activity   # [N, rows, cols] each
    maps.path["method"]                                       # "incremental" or "batched"

``convlens probe occlusion`` runs it on images and renders Fig. 7 (see ``docs/probes/occlusion.md``).
"""

import convlens

from ._compute import (
    METHODS,
    OcclusionApproxWarning,
    OcclusionFallbackWarning,
    OcclusionMaps,
    flop_analysis,
    occlusion_maps,
)
from ._grid import OcclusionGrid, default_window, paint
from ._incremental import IncrementalOcclusion, UnsupportedModel
from ._probe import POSITION_BUDGET, OcclusionProbe, auto_stride, class_names, parse_fill

__all__ = [
    "occlusion_maps",
    "flop_analysis",
    "OcclusionMaps",
    "OcclusionGrid",
    "OcclusionProbe",
    "OcclusionFallbackWarning",
    "OcclusionApproxWarning",
    "IncrementalOcclusion",
    "UnsupportedModel",
    "METHODS",
    "POSITION_BUDGET",
    "auto_stride",
    "class_names",
    "default_window",
    "paint",
    "parse_fill",
]


@convlens.hookimpl
def convlens_register_probes(registry):
    """Register the ``occlusion`` probe."""
    registry.register(OcclusionProbe.name, OcclusionProbe)
