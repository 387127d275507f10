"""Built-in convlens probe ``correspondence``: Zeiler & Fergus (2014), Section 4.3, Table 1, Fig. 8.

Mask the same object part (an eye, the nose) with a grey box in several images and ask whether
the features change the same way in each: ``Delta_l = sum_{i != j} H(sign(eps_i), sign(eps_j))``
with ``eps_i = x_i - x~_i`` at layer ``l``, against masks at random positions. See
``docs/probes/correspondence.md``.

Public API::

    from convlens_correspondence import correspondence, embedded_faces, read_parts, delta
"""

from __future__ import annotations

import convlens
from convlens_correspondence.analysis import (
    NORMALISATION,
    RANDOM,
    CorrespondenceResult,
    Row,
    correspondence,
)
from convlens_correspondence.delta import apply_masks, delta, map_box, sign_hamming
from convlens_correspondence.features import extract, paper_layer, paper_layers
from convlens_correspondence.parts import (
    FACE_PARTS,
    PartImage,
    embedded_faces,
    read_parts,
    write_face_parts,
)
from convlens_correspondence.probe import CorrespondenceProbe

__all__ = [
    "CorrespondenceProbe",
    "correspondence",
    "CorrespondenceResult",
    "Row",
    "RANDOM",
    "NORMALISATION",
    "delta",
    "sign_hamming",
    "map_box",
    "apply_masks",
    "extract",
    "paper_layer",
    "paper_layers",
    "PartImage",
    "FACE_PARTS",
    "embedded_faces",
    "read_parts",
    "write_face_parts",
]


@convlens.hookimpl
def convlens_register_probes(registry) -> None:
    """Register the ``correspondence`` probe."""
    registry.register(CorrespondenceProbe.name, CorrespondenceProbe)
