"""The evaluation protocol of the ``linear`` probe (Zeiler & Fergus 2014, Sec. 5.2): the seeded
splits recomputed from their documented rule, and the issue's independent check: features from
plain forward hooks, scikit-learn classifiers, the splits listed in ``linear.json`` -> the same
accuracies within 1.5 points."""

from __future__ import annotations

import json
from pathlib import Path

import convlens_linear
import numpy as np
import pytest
import torch
from convlens_linear import make_splits, result_table
from convlens_linear._protocol import FoldResult, Result
from PIL import Image

from convlens import run_probe
from convlens.errors import ConvlensError
from convlens.models import ModelInfo
from convlens.plugins import PluginHost
from convlens.testing import tiny_model

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_splits_follow_the_documented_rule():
    labels = np.repeat(np.arange(3), [7, 9, 8])
    valid = np.ones(len(labels), bool)
    valid[[2, 10]] = False
    splits = make_splits(labels, [2, 4], 3, folds=2, seed=7, cv_folds=3, valid=valid)
    assert [(s.k, s.fold) for s in splits] == [(2, 0), (2, 1), (4, 0), (4, 1)]
    for s in splits:
        # the rule of the docs and of linear.json's "split_rule", recomputed with numpy
        rng = np.random.default_rng([7, s.k, s.fold])
        train, test = [], []
        for c in range(3):
            perm = rng.permutation(np.flatnonzero((labels == c) & valid))
            train += perm[: s.k].tolist()
            test += perm[s.k : s.k + 3].tolist()
        assert s.train.tolist() == train and s.test.tolist() == test
        assert s.cv_fold.tolist() == [i % min(3, s.k) for i in range(s.k)] * 3
        assert not set(train) & set(test) and not {2, 10} & set(train + test)
        assert np.bincount(labels[s.train]).tolist() == [s.k] * 3
    assert splits[0].train.tolist() != splits[1].train.tolist()  # folds differ
    again = make_splits(labels, [2, 4], 3, folds=2, seed=7, cv_folds=3, valid=valid)
    assert all(a.to_dict() == b.to_dict() for a, b in zip(splits, again, strict=True))


def test_splits_refuse_a_class_too_small_for_k():
    labels = np.repeat(np.arange(2), [5, 3])
    with pytest.raises(
        ConvlensError, match=r"class 'b' has 3 readable image\(s\).*needs at least 4"
    ):
        make_splits(labels, [3], 2, folds=1, seed=0, class_names=["a", "b"])
    with pytest.raises(ConvlensError):
        make_splits(labels, [0], 2, folds=1, seed=0)


def test_table_cells_are_mean_and_population_std():
    r = Result(
        "conv5",
        "svm",
        30,
        [FoldResult(f, a, 1.0, None, [], True) for f, a in enumerate([80.0, 84.0, 82.0])],
    )
    assert r.mean == pytest.approx(82.0) and r.std == pytest.approx(np.std([80, 84, 82]))
    table = result_table([r, Result("conv5", "svm", 15, [FoldResult(0, 70.0, 1, None, [], True)])])
    assert table == {
        "columns": ["15/class", "30/class"],
        "rows": [{"classifier": "svm", "layer": "conv5", "cells": ["70.0 ± 0.0", "82.0 ± 1.6"]}],
    }


# -- the independent check ---------------------------------------------------------------------


def tiny() -> torch.nn.Module:
    model, _ = tiny_model("chain")
    model.convlens_info = ModelInfo(
        "tiny-chain", "test", "seed0", False, 5, (3, 32, 32), MEAN, STD, "bilinear", 1.0
    )
    return model


def make_folder(root: Path, classes: int = 4, per_class: int = 30, size: int = 32) -> Path:
    """Each class a hue, each image that hue jittered, on pixel noise: accuracy well above
    chance and well below 100 %, so that a disagreement would show."""
    rng = np.random.default_rng(4)
    for c in range(classes):
        d = root / f"c{c}"
        d.mkdir(parents=True)
        hue = 2 * np.pi * c / classes
        base = np.array([np.cos(hue), np.sin(hue), -np.cos(hue)]) * 30 + 128
        for i in range(per_class):
            colour = base + rng.normal(0, 22, 3)
            rgb = colour + rng.normal(0, 50, (size, size, 3))
            Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(d / f"{i:02d}.png")
    return root


def test_independent_check_with_plain_hooks_and_sklearn(tmp_path):
    """Features from forward hooks on the model (torchvision preprocessing), scikit-learn's
    StandardScaler + GridSearchCV(LogisticRegression / LinearSVC) with the CV folds and the
    splits read from linear.json: per (layer, classifier, K), the mean accuracy over folds is
    within 1.5 points of the probe's (in practice every fold agrees exactly)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import GridSearchCV, PredefinedSplit
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC
    from torchvision import transforms

    data = make_folder(tmp_path / "data")
    host = PluginHost(entry_points=False, extra=[("linear", convlens_linear)])
    run_probe("linear", tiny(), out=tmp_path / "out", host=host, overview=False, data=data,
              layers="conv2,conv3", train_per_class="4,10", test_per_class=20, folds=3,
              c_grid="1e-4,1e-2,1", seed=3)  # fmt: skip
    meta = json.loads((tmp_path / "out" / "linear" / "linear.json").read_text())
    assert [la["pool"] for la in meta["layers"]] == ["none", "none"]
    assert meta["protocol"]["c_grid"] == [1e-4, 1e-2, 1.0]

    tf = transforms.Compose(
        [
            transforms.Resize(32),
            transforms.CenterCrop(32),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )
    paths = [data / p for p in meta["dataset"]["paths"]]
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])
    model, got = tiny(), {}
    modules = {"conv2": model.features.relu2, "conv3": model.features.relu3}
    hooks = [
        m.register_forward_hook(lambda mod, i, o, k=k: got.__setitem__(k, o.flatten(1)))
        for k, m in modules.items()
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    labels = np.asarray(meta["dataset"]["labels"])
    grid = {"C": meta["protocol"]["c_grid"]}
    models = {  # precise solvers (the probe's solutions are converged too)
        "softmax": LogisticRegression(solver="newton-cg", max_iter=10000, tol=1e-8),
        "svm": LinearSVC(dual=False, max_iter=100000, tol=1e-6, intercept_scaling=1000.0),
    }
    ours = {(r["layer"], r["classifier"], r["k"]): r["mean_pct"] for r in meta["results"]}
    assert len(ours) == 8
    accs: dict = {}
    for split in meta["splits"]:
        train, test = np.asarray(split["train"]), np.asarray(split["test"])
        for layer in ("conv2", "conv3"):
            feats = got[layer].numpy().astype(np.float64)
            scaler = StandardScaler().fit(feats[train])
            xtr, xte = scaler.transform(feats[train]), scaler.transform(feats[test])
            for kind, est in models.items():
                search = GridSearchCV(
                    est,
                    grid,
                    scoring="balanced_accuracy",
                    cv=PredefinedSplit(np.asarray(split["cv_fold"])),
                )
                search.fit(xtr, labels[train])
                acc = 100 * balanced_accuracy_score(labels[test], search.predict(xte))
                accs.setdefault((layer, kind, split["k"]), []).append(acc)
    for key, values in accs.items():
        assert abs(np.mean(values) - ours[key]) <= 1.5, (key, np.mean(values), ours[key])
    # the task is neither trivial nor hopeless: the comparison means something
    assert 35 < min(ours.values()) and max(ours.values()) < 95
