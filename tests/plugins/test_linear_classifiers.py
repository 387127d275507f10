"""The ``linear`` probe's torch classifiers against scikit-learn on the same features:
``LogisticRegression`` (softmax) and ``LinearSVC`` (one-vs-rest squared hinge), the
cross-validated choice of ``C`` against ``GridSearchCV``, and the exactness of the reduced
(Gram) formulation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from convlens_linear import (
    balanced_accuracy,
    evaluate,
    fit_classifier,
    fit_many,
    make_splits,
    per_class_accuracy,
    select_c,
)
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import GridSearchCV, PredefinedSplit
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from convlens.errors import ConvlensError

# tight tolerances make scikit-learn's line searches complain near the optimum
pytestmark = pytest.mark.filterwarnings("ignore:.*[Ll]ine [Ss]earch")


def blobs(n_per_class: int, dim: int, classes: int = 5, seed: int = 0, spread: float = 0.12):
    """Overlapping Gaussian classes with unequal feature scales (so standardisation matters)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(0, spread, (classes, dim))
    scales = np.random.default_rng(98).uniform(0.2, 5.0, dim)
    y = np.repeat(np.arange(classes), n_per_class)
    x = (centres[y] + rng.normal(0, 1, (len(y), dim))) * scales + 3.0
    return x.astype(np.float32), y


def sklearn_model(kind: str, c: float):
    if kind == "softmax":  # newton-cg: converges tightly (lbfgs stops early on flat problems)
        return LogisticRegression(C=c, solver="newton-cg", max_iter=20000, tol=1e-12)
    # intercept_scaling makes liblinear's penalised intercept (nearly) unpenalised, as here
    return LinearSVC(C=c, dual=False, max_iter=200000, tol=1e-10, intercept_scaling=1000.0)


@pytest.mark.parametrize("kind", ["softmax", "svm"])
@pytest.mark.parametrize("n_per_class,dim", [(12, 400), (80, 30)])  # n < D (reduced), n > D
def test_accuracy_and_scores_agree_with_sklearn(kind, n_per_class, dim):
    x, y = blobs(n_per_class, dim)
    xt, yt = blobs(60, dim, seed=1)
    scaler = StandardScaler().fit(x)
    for c in (1e-3, 1e-1, 1.0):
        ours = fit_classifier(x, y, kind, c)
        ref = sklearn_model(kind, c).fit(scaler.transform(x), y)
        acc = 100 * balanced_accuracy(ours.predict(xt), yt, 5)
        acc_ref = 100 * balanced_accuracy_score(yt, ref.predict(scaler.transform(xt)))
        assert abs(acc - acc_ref) <= 1.0, (kind, c, acc, acc_ref)
        assert ours.converged
        s = ours.decision_function(xt).numpy()
        s_ref = ref.decision_function(scaler.transform(xt))
        if kind == "softmax":  # logits are defined up to a per-row constant
            s, s_ref = s - s.mean(1, keepdims=True), s_ref - s_ref.mean(1, keepdims=True)
        np.testing.assert_allclose(s, s_ref, atol=2e-2 * max(1.0, np.abs(s_ref).max()))


def test_fit_many_equals_separate_fits():
    sets = [blobs(10, 50, seed=s) for s in range(3)]
    together = fit_many(sets, [1e-2, 1e-1, 1.0], "softmax", 5)
    for (x, y), c, clf in zip(sets, [1e-2, 1e-1, 1.0], together, strict=True):
        alone = fit_classifier(x, y, "softmax", c)
        torch.testing.assert_close(
            clf.decision_function(x), alone.decision_function(x), atol=1e-4, rtol=1e-4
        )


def test_cross_validated_c_agrees_with_gridsearchcv():
    """Same folds (PredefinedSplit), same scorer, standardisation on the whole training set:
    the CV curve and the chosen C agree with scikit-learn's."""
    grid = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    x, y = blobs(15, 200, seed=3, spread=0.1)
    folds = np.tile(np.arange(15) % 3, 5)  # the protocol's rule: i-th image of a class -> i mod 3
    xs = StandardScaler().fit_transform(x)
    for kind in ("softmax", "svm"):
        ((best, scores),) = select_c([(x, y, folds)], kind, 5, grid)
        search = GridSearchCV(
            sklearn_model(kind, 1.0),
            {"C": grid},
            cv=PredefinedSplit(folds),
            scoring="balanced_accuracy",
        ).fit(xs, y)
        ref = search.cv_results_["mean_test_score"]
        np.testing.assert_allclose(scores, ref, atol=0.03)
        # the choice may differ only between C values that score the same (within noise)
        assert ref[grid.index(best)] >= ref.max() - 0.03, (kind, best, scores, ref)


def test_reduced_gram_path_equals_full_feature_path(monkeypatch):
    """With fewer training images than dimensions the protocol solves in Gram coordinates;
    forcing the plain path (standardised features as they are, no reduction) must give the
    same choices and accuracies."""
    import convlens_linear._classifiers as clf
    import convlens_linear._protocol as proto

    x, y = blobs(12, 300, classes=4, seed=5)
    splits = make_splits(y, [3, 6], 6, folds=2, seed=0)
    fast = evaluate({"f": x}, y, splits, ["softmax", "svm"], [1e-3, 1e-1, 1.0])
    monkeypatch.setattr(proto, "_GRAM_MAX_ROWS", 0)
    monkeypatch.setattr(clf, "_ROTATE_MAX_WORK", 0)
    slow = evaluate({"f": x}, y, splits, ["softmax", "svm"], [1e-3, 1e-1, 1.0])
    for a, b in zip(fast, slow, strict=True):
        assert (a.layer, a.classifier, a.k) == (b.layer, b.classifier, b.k)
        assert [f.C for f in a.folds] == [f.C for f in b.folds]
        assert a.mean == pytest.approx(b.mean, abs=1e-9)
        for fa, fb in zip(a.folds, b.folds, strict=True):
            np.testing.assert_allclose(fa.cv_scores, fb.cv_scores, atol=1e-6)
            assert fa.per_class == fb.per_class


def test_balanced_accuracy_is_sklearns():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 50)
    pred = np.where(rng.random(50) < 0.6, y, rng.integers(0, 4, 50))
    assert balanced_accuracy(pred, y, 4) == pytest.approx(balanced_accuracy_score(y, pred))
    pcs = per_class_accuracy(pred, y, 5)
    assert np.isnan(pcs[4]) and pcs[:4] == pytest.approx(
        [np.mean(pred[y == c] == c) for c in range(4)]
    )


def test_bad_classifier_name():
    x, y = blobs(4, 6)
    with pytest.raises(ConvlensError, match="classifier 'ridge'"):
        fit_classifier(x, y, "ridge")
