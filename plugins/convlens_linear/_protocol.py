"""The evaluation protocol of Zeiler & Fergus 2014, Sec. 5.2 (Tables 4, 5, 7; Fig. 9), after
Fei-Fei et al. (2006) and Griffin et al. (2006): ``K`` random training images per class, testing
on up to ``M`` of the remaining images per class, ``F`` random folds, reporting the mean of the
per-class accuracies, as mean +- std over the folds.

The splits are reproducible from the seed alone (and listed in ``linear.json``): for training size
``K`` and fold ``f``, ``rng = numpy.random.default_rng([seed, K, f])``; for each class ``c`` in
class order, ``perm = rng.permutation(idx_c)`` where ``idx_c`` are the class's readable images in
dataset order; ``train = perm[:K]``, ``test = perm[K:K+M]``. Cross-validation inside the training
split puts the ``i``-th training image of each class (in ``perm`` order) in fold ``i mod V``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from convlens.errors import ConvlensError
from convlens_linear._classifiers import (
    CLASSIFIERS,
    DEFAULT_C_GRID,
    CVFold,
    _cv_select,
    _reduce_gram,
    _reduce_rows,
    _solve_many,
    _standardizer,
    _work_dtype,
    balanced_accuracy,
    per_class_accuracy,
)

__all__ = ["Split", "FoldResult", "Result", "make_splits", "evaluate", "result_table"]

# Training values held at once while batching folds and layers (float32 values).
_BATCH_VALUES = 150_000_000


@dataclass(frozen=True)
class Split:
    """One train/test split: image indices into the dataset, and the cross-validation fold of
    each training image."""

    k: int
    fold: int
    train: np.ndarray
    test: np.ndarray
    cv_fold: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "fold": self.fold,
            "train": self.train.tolist(),
            "cv_fold": self.cv_fold.tolist(),
            "test": self.test.tolist(),
        }


def make_splits(
    labels: np.ndarray,
    train_per_class: Sequence[int],
    test_per_class: int,
    folds: int,
    seed: int,
    cv_folds: int = 3,
    valid: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
) -> list[Split]:
    """The seeded splits of the module docstring, for every ``K`` in ``train_per_class`` and
    fold ``0..folds-1``. ``valid`` (a mask) leaves out unreadable images.

    Raises:
        ConvlensError: a class with no more than ``K`` readable images, or bad sizes.
    """
    labels = np.asarray(labels)
    if folds < 1 or test_per_class < 1 or not train_per_class:
        raise ConvlensError("splits: need folds >= 1, test-per-class >= 1 and a training size")
    if any(k < 1 for k in train_per_class):
        raise ConvlensError(f"train-per-class {list(train_per_class)}: sizes must be >= 1")
    ok = np.ones(len(labels), bool) if valid is None else np.asarray(valid, bool)
    n_classes = int(labels.max()) + 1
    per_class = [np.flatnonzero((labels == c) & ok) for c in range(n_classes)]
    biggest = max(train_per_class)
    for c, idx in enumerate(per_class):
        if len(idx) <= biggest:
            name = class_names[c] if class_names else str(c)
            raise ConvlensError(
                f"class {name!r} has {len(idx)} readable image(s); --train-per-class {biggest} "
                f"needs at least {biggest + 1} (K to train, at least one to test)"
            )
    out = []
    for k in train_per_class:
        v = max(1, min(cv_folds, k))
        for f in range(folds):
            rng = np.random.default_rng([seed, k, f])
            tr, te, cv = [], [], []
            for idx in per_class:
                perm = rng.permutation(idx)
                tr.append(perm[:k])
                te.append(perm[k : k + test_per_class])
                cv.append(np.arange(k) % v)
            out.append(Split(k, f, np.concatenate(tr), np.concatenate(te), np.concatenate(cv)))
    return out


@dataclass
class FoldResult:
    """One fold: accuracy (mean per-class, %), the chosen ``C`` and its CV scores (%)."""

    fold: int
    accuracy: float
    C: float
    cv_scores: list[float] | None
    per_class: list[float]
    converged: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "fold": self.fold,
            "accuracy_pct": self.accuracy,
            "C": self.C,
            "cv_scores_pct": self.cv_scores,
            "per_class_pct": self.per_class,
            "converged": self.converged,
        }


@dataclass
class Result:
    """One cell of the table: a layer, a classifier, a training size, over all folds."""

    layer: str
    classifier: str
    k: int
    folds: list[FoldResult] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return float(np.mean([f.accuracy for f in self.folds]))

    @property
    def std(self) -> float:
        """Population standard deviation over the folds (numpy's default, ddof=0)."""
        return float(np.std([f.accuracy for f in self.folds]))

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "classifier": self.classifier,
            "k": self.k,
            "mean_pct": self.mean,
            "std_pct": self.std,
            "folds": [f.to_dict() for f in self.folds],
        }


def _rows(feats: Any, idx: np.ndarray) -> np.ndarray:
    return np.asarray(feats[idx], dtype=np.float32)


def evaluate(
    features: Mapping[str, Any],
    labels: np.ndarray,
    splits: Sequence[Split],
    classifiers: Sequence[str] = CLASSIFIERS,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    *,
    device: torch.device | str | None = None,
    progress: Callable[[str, int | None], Any] | None = None,
) -> list[Result]:
    """Train and test every classifier on every layer's features for every split.

    ``features[layer]`` is indexable by an index array (``[N, D]``; a :class:`ShardedFeatures`
    or an array). Per split, the features are standardised with the training images'
    statistics; ``C`` is chosen by cross-validation over ``c_grid`` on the training images only
    (see :func:`~convlens_linear.select_c`); with one training image per class no
    cross-validation is possible and the middle grid value is used (the lower of the two middle
    ones for an even count; recorded: no ``cv_scores``).
    When a split has fewer training images than feature dimensions, everything is computed
    from Gram matrices (exactly the same problems, in ``n`` instead of ``D`` coordinates).
    Accuracies are in percent.
    """
    for kind in classifiers:
        if kind not in CLASSIFIERS:
            raise ConvlensError(f"classifier {kind!r}: expected one of {', '.join(CLASSIFIERS)}")
    labels = np.asarray(labels)
    n_classes = int(labels.max()) + 1
    layers = list(features)
    ks = sorted({s.k for s in splits})
    grid = sorted(float(c) for c in c_grid)
    results = {
        (la, kind, k): Result(la, kind, k) for kind in classifiers for la in layers for k in ks
    }
    plan = [
        group
        for k in ks
        for group in _groups([(la, s) for la in layers for s in splits if s.k == k], features)
    ]
    bar = (
        progress("fitting classifiers", len(plan) * len(classifiers))
        if progress
        else contextlib.nullcontext()
    )
    with bar as advance:
        for group in plan:
            prepared = [_prepare_split(features[la], labels, s, device) for la, s in group]
            for kind in classifiers:
                _fit_group(group, prepared, kind, grid, n_classes, results)
                if advance:
                    advance(1)
    return [
        results[key]
        for key in sorted(
            results, key=lambda t: (classifiers.index(t[1]), layers.index(t[0]), t[2])
        )
    ]


def _groups(items: list[tuple[str, Split]], features: Mapping[str, Any]) -> list[list]:
    groups, cur, size = [], [], 0
    for la, s in items:
        this = (len(s.train) + len(s.test)) * int(features[la].shape[1])
        if cur and size + this > _BATCH_VALUES:
            groups.append(cur)
            cur, size = [], 0
        cur.append((la, s))
        size += this
    if cur:
        groups.append(cur)
    return groups


@dataclass
class _Prepared:
    cv: list[CVFold] | None
    z: torch.Tensor
    y: torch.Tensor
    z_test: torch.Tensor
    y_test: np.ndarray


# Gram path up to this many training images (an n x n eigendecomposition per fold).
_GRAM_MAX_ROWS = 4096


def _prepare_split(feats: Any, labels: np.ndarray, s: Split, device: Any) -> _Prepared:
    """Standardise one split's rows with its training statistics and express its CV folds,
    training set and test set in reduced coordinates (see ``_classifiers``)."""
    x_tr = torch.as_tensor(_rows(feats, s.train), device=device)
    x_te = torch.as_tensor(_rows(feats, s.test), device=device)
    n, d = x_tr.shape
    dtype = _work_dtype(n, d)
    x_tr, x_te = x_tr.to(dtype), x_te.to(dtype)
    mean, scale = _standardizer(x_tr)
    xs, xs_te = (x_tr - mean) / scale, (x_te - mean) / scale
    y = torch.as_tensor(labels[s.train], device=xs.device)
    folds = s.cv_fold
    ids = np.unique(folds)
    cv: list[CVFold] | None = [] if len(ids) >= 2 else None
    if n <= d and n <= _GRAM_MAX_ROWS:
        g, g_te = xs @ xs.T, xs_te @ xs.T
        for j in ids if cv is not None else ():
            fit = torch.as_tensor(np.flatnonzero(folds != j), device=xs.device)
            val = torch.as_tensor(np.flatnonzero(folds == j), device=xs.device)
            z, proj = _reduce_gram(g[fit][:, fit])
            cv.append(CVFold(z, y[fit], g[val][:, fit] @ proj, y[val]))
        z, proj = _reduce_gram(g)
        z_te = g_te @ proj
    else:
        for j in ids if cv is not None else ():
            fit = torch.as_tensor(np.flatnonzero(folds != j), device=xs.device)
            val = torch.as_tensor(np.flatnonzero(folds == j), device=xs.device)
            z, basis = _reduce_rows(xs[fit])
            cv.append(CVFold(z, y[fit], xs[val] if basis is None else xs[val] @ basis, y[val]))
        z, basis = _reduce_rows(xs)
        z_te = xs_te if basis is None else xs_te @ basis
    return _Prepared(cv, z, y, z_te, labels[s.test])


def _fit_group(
    group: list[tuple[str, Split]],
    prepared: list[_Prepared],
    kind: str,
    grid: list[float],
    n_classes: int,
    results: dict,
) -> None:
    middle = float(grid[(len(grid) - 1) // 2])
    chosen: list[tuple[float, list[float] | None]] = [(middle, None)] * len(group)
    with_cv = [i for i, p in enumerate(prepared) if p.cv is not None]
    if with_cv:
        picked = _cv_select(
            [prepared[i].cv for i in with_cv], kind, n_classes, grid, max_iter=400, tol=1e-6
        )
        for i, (c, scores) in zip(with_cv, picked, strict=True):
            chosen[i] = (c, [100.0 * v for v in scores])
    items = [
        (p.z, p.y, torch.tensor([c], dtype=p.z.dtype, device=p.z.device))
        for p, (c, _) in zip(prepared, chosen, strict=True)
    ]
    solved = _solve_many(items, kind, n_classes, max_iter=1000, tol=1e-6)
    for (la, s), p, (a, b, _, ok), (c, scores) in zip(group, prepared, solved, chosen, strict=True):
        pred = (p.z_test.to(a.dtype) @ a[0] + b[0]).argmax(1).cpu().numpy()
        acc = 100.0 * balanced_accuracy(pred, p.y_test, n_classes)
        pcs = [float(v) for v in 100.0 * per_class_accuracy(pred, p.y_test, n_classes)]
        results[(la, kind, s.k)].folds.append(FoldResult(s.fold, acc, c, scores, pcs, ok))


def result_table(results: Sequence[Result]) -> dict[str, Any]:
    """Table 7 of the paper, generalised: one row per (classifier, layer), one column per
    training size, cells ``"mean ± std"`` in percent."""
    ks = sorted({r.k for r in results})
    rows: dict[tuple[str, str], dict[int, Result]] = {}
    for r in results:
        rows.setdefault((r.classifier, r.layer), {})[r.k] = r
    return {
        "columns": [f"{k}/class" for k in ks],
        "rows": [
            {
                "classifier": kind,
                "layer": layer,
                "cells": [
                    f"{cells[k].mean:.1f} ± {cells[k].std:.1f}" if k in cells else "—" for k in ks
                ],
            }
            for (kind, layer), cells in rows.items()
        ],
    }
