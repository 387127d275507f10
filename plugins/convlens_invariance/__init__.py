"""Built-in convlens probe ``invariance``: Zeiler & Fergus (2014), Section 4, Fig. 5.

Translate (vertically), scale and rotate each image over a range of amounts and record, relative
to the untransformed image, the Euclidean distance between feature vectors at a low and a high
layer and the probability of the true label. See ``docs/probes/invariance.md``.

Public API::

    from convlens_invariance import invariance, warp, amounts_for, translation_growth
"""

from __future__ import annotations

import convlens
from convlens_invariance.analysis import InvarianceResult, invariance, translation_growth
from convlens_invariance.probe import InvarianceProbe, plot_transform
from convlens_invariance.transforms import (
    CANVAS,
    DEFAULT_AMOUNTS,
    TRANSFORMS,
    amounts_for,
    resized_tensor,
    warp,
)

__all__ = [
    "InvarianceProbe",
    "invariance",
    "InvarianceResult",
    "translation_growth",
    "plot_transform",
    "warp",
    "resized_tensor",
    "amounts_for",
    "TRANSFORMS",
    "CANVAS",
    "DEFAULT_AMOUNTS",
]


@convlens.hookimpl
def convlens_register_probes(registry) -> None:
    """Register the ``invariance`` probe."""
    registry.register(InvarianceProbe.name, InvarianceProbe)
