"""The ``auto`` rule's measurement, kept on disk (``choose_rule(..., cache=True)``).

Measuring image_specificity projects a few units of a few photos through the whole network: on
vgg16 at 224 about as long as a quarter of an occlusion sweep. Its answer depends only on the
weights, the layer, the photos and the options, so it is stored as a small JSON file under
``<convlens cache>/rules/`` (``$CONVLENS_CACHE``, else ``$XDG_CACHE_HOME/convlens``, else
``~/.cache/convlens``) and read back by any later call with the same ones.

The key: the model's class and, for every parameter and buffer, its name, dtype, shape, the
sum of its values (in its own dtype) and its first 16 values (one pass over the weights that
copies nothing: 0.15 s for vgg16's 138 M parameters on a shared 2-core VM, where float64 sums
took 0.9 s); the BLAKE2b digest of the input images' bytes; the layer and the options. A sum that
rounds differently another time only costs a measurement. Any retraining,
fine-tuning or edit of the weights changes some sum. A file that cannot be read or parsed is
ignored and measured again; files are written to a temporary name and renamed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["rule_key", "load_choice", "store_choice", "weights_digest"]

#: Bump when the measurement or the choice changes meaning.
VERSION = 2


def weights_digest(model: nn.Module) -> str:
    """A digest of the model's class and every parameter and buffer (see the module
    docstring)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    with torch.no_grad():
        for name, t in (*model.named_parameters(), *model.named_buffers()):
            t = t.detach()
            # the tensor's own dtype: a float64 sum converts every element and costs ~20x more;
            # a sum that rounds differently another time only costs a measurement
            total = float(t.sum()) if t.numel() else 0.0
            head = t.reshape(-1)[:16].cpu().contiguous()
            h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0{total!r}\0".encode())
            h.update(head.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def rule_key(model, inputs: torch.Tensor, layer: str, requested: str, units: int, mode: str,
             method: str, precision: str = "fp32") -> str:  # fmt: skip
    """The file name (a hex digest) of one measurement."""
    x = inputs.detach().to("cpu", torch.float32).contiguous()
    img = hashlib.blake2b(x.numpy().tobytes(), digest_size=16).hexdigest()
    text = json.dumps(
        [
            VERSION,
            weights_digest(model),
            list(x.shape),
            img,
            layer,
            requested,
            units,
            mode,
            method,
            precision,
            bool(model.training),
        ],  # fmt: skip
    )
    return hashlib.blake2b(text.encode(), digest_size=20).hexdigest()


def _folder() -> Path:
    from convlens.data.mining import cache_root

    return cache_root() / "rules"


def load_choice(key: str) -> dict[str, Any] | None:
    """The stored fields of a RuleChoice, or None."""
    path = _folder() / f"{key}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data["choice"] if data.get("version") == VERSION else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def store_choice(key: str, choice: Any) -> None:
    """Write a RuleChoice (best effort: a read-only cache folder only costs the measurement
    next time)."""
    folder = _folder()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".rule-", suffix=".json", dir=folder)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({"version": VERSION, "choice": dataclasses.asdict(choice)}, fh)
        os.chmod(tmp, 0o644)
        os.replace(tmp, folder / f"{key}.json")
    except OSError:
        return
