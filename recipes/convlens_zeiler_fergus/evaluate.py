"""Evaluation as Section 3 and Table 2: ten-crop softmax averages, top-1/top-5 error, ensembles.

    from convlens_zeiler_fergus.evaluate import predict, topk_errors, ensemble
    probs, labels = predict(model, bundle, bundle.val, range(len(bundle.val)), prep, crops=10)
    topk_errors(probs, labels)        # {"top1_err": 38.4, "top5_err": 16.5, "n": 50000}
    convlens recipe zeiler-fergus --data /data/imagenet --ensemble runs/a --ensemble runs/b

"10 different sub-crops of size 224x224 (corners + center with(out) horizontal flips)"
(Section 3): the class probabilities of the ten views are averaged. Ensembles (Table 2: "5
convnets", "(a) & (b) combined") average the models' (ten-crop) softmax outputs, read from each
run's ``val_probs.npy``. Errors are in percent, as in the paper's tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import BatchSampler

from convlens.errors import ConvlensError
from convlens_zeiler_fergus.data import BatchPrep, DataBundle
from convlens_zeiler_fergus.distributed import DistEnv

__all__ = ["predict", "topk_errors", "ensemble", "load_val_probs"]


@torch.no_grad()
def predict(
    model: nn.Module,
    data: DataBundle,
    dataset: Any,
    indices: Sequence[int],
    prep: BatchPrep,
    crops: int = 10,
    batch_size: int = 128,
    dist: DistEnv | None = None,
    amp_dtype: torch.dtype | None = None,
    workers: int = 0,
    pin_memory: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities averaged over ``crops`` views (1: centre; 10: corners + centre and
    their flips) for ``dataset[indices]``: ``(probs [N, C] float32, labels [N])`` on the CPU, in
    the order of ``indices``. DDP ranks each take a contiguous share; every rank gets all rows."""
    dist = dist or DistEnv()
    device = prep.device
    indices = list(indices)
    lo, hi = dist.chunk(len(indices))
    was_training = model.training
    model.eval()
    probs: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    try:
        if hi > lo:
            loader = data.loader(
                dataset, BatchSampler(indices[lo:hi], batch_size, False), workers, pin_memory
            )
            for xb, yb in loader:
                x8 = data.to_device_uint8(xb, device)
                p = None
                for view in prep.views(x8, crops):
                    with torch.autocast(
                        device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
                    ):
                        logits = model(view)
                    q = logits.float().softmax(-1)
                    p = q if p is None else p + q
                assert p is not None
                probs.append(p / crops)
                labels.append(yb.to(device))
    finally:
        model.train(was_training)
    n_cls = _num_classes(model)
    local_p = torch.cat(probs) if probs else torch.zeros(0, n_cls, device=device)
    local_y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64, device=device)
    all_p = dist.gather_rows(local_p, len(indices))
    all_y = dist.gather_rows(local_y, len(indices))
    return all_p.cpu(), all_y.cpu()


def _num_classes(model: nn.Module) -> int:
    n = getattr(model, "num_classes", None)
    if n is None:
        n = getattr(getattr(model, "module", None), "num_classes", None)
    if n is None:
        raise ConvlensError(f"{type(model).__name__}: cannot tell its number of classes")
    return int(n)


def topk_errors(
    probs: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, ks: Sequence[int] = (1, 5)
) -> dict[str, Any]:
    """Top-k error in percent: the share of rows whose label is not among the ``k`` most probable
    classes (ties broken by class index). ``{"top1_err": ..., "top5_err": ..., "n": N}``."""
    p = torch.as_tensor(np.asarray(probs), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    if p.ndim != 2 or len(p) != len(y):
        raise ConvlensError(f"topk_errors: probs {tuple(p.shape)} and labels {tuple(y.shape)}")
    out: dict[str, Any] = {"n": len(y)}
    if len(y) == 0:
        return out | {f"top{k}_err": None for k in ks}
    for k in ks:
        kk = min(k, p.shape[1])
        top = p.topk(kk, dim=1).indices
        hit = (top == y[:, None]).any(1)
        out[f"top{k}_err"] = float(100.0 * (1.0 - hit.double().mean()))
    return out


def load_val_probs(run: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """A trained run's saved validation outputs: ``(probs, labels, eval.json)``."""
    import json

    run = Path(run)
    if run.is_file():
        run = run.parent
    probs_path, labels_path = run / "val_probs.npy", run / "val_labels.npy"
    if not probs_path.is_file() or not labels_path.is_file():
        raise ConvlensError(f"{run}: no val_probs.npy/val_labels.npy (train or evaluate it first)")
    meta = json.loads((run / "eval.json").read_text()) if (run / "eval.json").is_file() else {}
    return np.load(probs_path).astype(np.float32), np.load(labels_path), meta


def ensemble(runs: Sequence[str | Path]) -> dict[str, Any]:
    """Table 2's ensembles: the average of the runs' validation softmax outputs, and its errors.
    All runs must have scored the same images in the same order."""
    if len(runs) < 2:
        raise ConvlensError("an ensemble needs at least 2 runs")
    total = None
    labels0 = None
    members = []
    for r in runs:
        p, y, meta = load_val_probs(r)
        if labels0 is None:
            labels0, total = y, p.astype(np.float64)
        else:
            if y.shape != labels0.shape or not np.array_equal(y, labels0):
                raise ConvlensError(f"{r}: scored different validation images than {runs[0]}")
            if p.shape != total.shape:
                raise ConvlensError(f"{r}: {p.shape[1]} classes, {runs[0]}: {total.shape[1]}")
            total += p
        members.append(
            {
                "run": str(r),
                "top1_err": meta.get("val", {}).get("top1_err"),
                "top5_err": meta.get("val", {}).get("top5_err"),
            }
        )
    assert total is not None and labels0 is not None
    errs = topk_errors(total / len(runs), labels0)
    return {"members": members, **errs}
