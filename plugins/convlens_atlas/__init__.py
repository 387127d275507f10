"""convlens's atlas: Zeiler & Fergus's Section 4 tour (Fig. 2 for every unit of a model over a
real dataset) as a static site a person can browse offline and share (``convlens atlas``).

    from convlens_atlas import build_atlas
    build_atlas(model, Path("out/atlas"), model_name="efficientnet_lite0", images=["photos/"])

**Pass 1** streams the images once through the deconv probe's miner
(:func:`convlens_deconv.mine_topk_layers`): for every unit of every chosen layer its top-k
activations from k different images, and a running summary of its activation distribution (mean,
activation rate, quantiles of its per-image maximum from a fixed-size histogram sketch) — memory
bounded by units × k, whatever the number of images; checkpointed every N images and resumable;
split across ``torchrun`` ranks and merged. **Pass 2** reads only the images in some top-k and
projects every slot with the deconv probe's :func:`~convlens_deconv.project` (the rule chosen per
layer by :func:`~convlens_deconv.choose_rule`), cuts receptive-field crops
(:mod:`convlens.render.crops`) and draws each unit's Fig. 2. Then the pages
(:mod:`convlens_atlas._site`).

The atlas is a command, not a probe: it lives beside the probes in ``plugins/`` because it is
built on the deconv plugin (the core ``convlens/`` knows no particular probe); the CLI command
(``convlens/cli/atlas.py``) imports it when run. See ``docs/atlas.md``.
"""

from __future__ import annotations

from convlens_atlas._build import (
    CHECKPOINT_DIR,
    SCHEMA,
    AtlasResult,
    build_atlas,
    remove_checkpoints,
    resolve_units,
)
from convlens_atlas._site import write_site

__all__ = [
    "build_atlas",
    "AtlasResult",
    "resolve_units",
    "remove_checkpoints",
    "write_site",
    "CHECKPOINT_DIR",
    "SCHEMA",
]
