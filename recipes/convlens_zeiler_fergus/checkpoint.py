"""Checkpoints that never lose progress and never need pickle.

    ckpt = load_checkpoint("runs/zeiler-fergus/zfnet/checkpoints/last.pt")   # weights_only=True
    convlens probe deconv --model zfnet --weights runs/zeiler-fergus/zfnet/model.pt

A checkpoint holds only tensors, dicts, lists, numbers and strings, so that
``torch.load(path, weights_only=True)`` reads it: the model and optimizer state dicts, the
plateau scheduler's state, the position (``epoch`` completed, ``step`` within the next epoch,
``global_step``), every rank's RNG states as uint8 tensors, the sampler's parameters as ints, the
per-pixel mean image, the class names, and the resolved config as a dict. It is written to a
temporary name and renamed (``convlens.io.atomic_path``), so a crash leaves the previous one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from convlens.errors import ConvlensError
from convlens.io import atomic_path

__all__ = ["FORMAT", "save_checkpoint", "load_checkpoint", "RESUMABLE_CHANGES", "check_resume"]

FORMAT = "convlens-zeiler-fergus-checkpoint"
VERSION = 1

#: Config keys a resumed run may change (they do not alter what is computed).
RESUMABLE_CHANGES = frozenset(
    {
        "epochs",
        "workers",
        "pin_memory",
        "compile",
        "ckpt_minutes",
        "ckpt_every_steps",
        "probes",
        "probe_images",
        "decode",
        "pack",
        "pack_dir",
        "cache_dir",
        "evolution_images",
        "evolution_channels",
        "data",
    }
)


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (plus the format tag) atomically with ``torch.save``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, "version": VERSION, **payload}, tmp)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (no code is ever unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise ConvlensError(f"{path}: no checkpoint there")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConvlensError(f"{path}: not a loadable checkpoint ({first})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ConvlensError(f"{path}: not a zeiler-fergus checkpoint")
    return ckpt


def check_resume(saved: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """Keys whose value differs between the checkpoint's config and the one given; an error if
    any of them would change what is computed (only :data:`RESUMABLE_CHANGES` may differ)."""
    changed = sorted(k for k in given if k in saved and saved[k] != given[k])
    unknown = sorted(k for k in saved if k not in given)
    if unknown:
        raise ConvlensError(f"checkpoint config has key {unknown[0]!r} this version does not know")
    bad = [k for k in changed if k not in RESUMABLE_CHANGES]
    if bad:
        k = bad[0]
        raise ConvlensError(
            f"--resume: config {k!r} is {given[k]!r} but the checkpoint was trained with "
            f"{saved[k]!r} (drop the option or start a new --out)"
        )
    return changed
