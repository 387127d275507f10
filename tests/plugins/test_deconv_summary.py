"""The running unit summaries the atlas keeps while mining: the quantile sketch against numpy
within its documented error, exact merges (split, streamed, merged = one pass), and the mean and
activation rate against a direct computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from convlens_deconv._summary import BINS, HistogramSketch, UnitSummary

QS = (0.01, 0.1, 0.25, 0.5, 0.9, 0.99, 1.0)


def _values(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = 700
    return np.stack(
        [
            rng.normal(0, 1, n),  # symmetric, negative and positive
            rng.exponential(3, n),  # skewed
            rng.exponential(3, n) * 1e4,  # large magnitudes
            rng.exponential(3, n) * 1e-4,  # tiny magnitudes
            np.full(n, 5.0),  # constant
            np.where(rng.random(n) < 0.5, 0.0, rng.normal(50, 1, n)),  # two far-apart clusters
        ],
        1,
    ).astype(np.float32)


def test_quantiles_are_within_one_bin_of_numpy_and_the_bin_is_under_the_bound():
    v = _values()
    s = HistogramSketch(v.shape[1])
    for i in range(0, len(v), 64):
        s.update(torch.from_numpy(v[i : i + 64]))
    w = s.bin_width().numpy()
    span = v.max(0).astype(np.float64) - v.min(0)
    assert (w <= np.maximum(4 * span / (BINS - 1), 2.0**-40 * np.abs(v).max(0) * 2)).all()
    for q in QS:
        ref = np.quantile(v.astype(np.float64), q, axis=0, method="inverted_cdf")
        est = s.quantile(q).numpy()
        assert (np.abs(est - ref) <= w + 1e-12).all(), (q, est, ref, w)
    assert s.quantile(1.0).numpy() == pytest.approx(v.max(0))
    assert (s.n.numpy() == len(v)).all()


def test_split_merged_and_streamed_sketches_are_identical():
    v = torch.from_numpy(_values(1))
    one = HistogramSketch(v.shape[1])
    one.update(v)
    streamed = HistogramSketch(v.shape[1])
    for i in range(0, len(v), 7):
        streamed.update(v[i : i + 7])
    a, b = HistogramSketch(v.shape[1]), HistogramSketch(v.shape[1])
    a.update(v[1::2])  # the wide values can arrive in either part first
    b.update(v[::2])
    b.merge(a)
    for s in (streamed, b):
        assert torch.equal(s.counts, one.counts)
        assert torch.equal(s.exp, one.exp) and torch.equal(s.k0, one.k0)
    restored = HistogramSketch(1)
    restored.load_state_dict(one.state_dict())
    assert torch.equal(restored.quantile(0.5), one.quantile(0.5))


def test_unit_summary_mean_rate_and_per_image_max_against_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    act = torch.relu(torch.randn(13, 4, 5, 6, generator=g) - 0.3)
    s = UnitSummary(4)
    s.update(act[:5])
    rest = UnitSummary(4)
    rest.update(act[5:])
    s.merge(rest)
    r = s.result()
    a = act.double()
    for u in range(4):
        assert r[u]["mean"] == pytest.approx(float(a[:, u].mean()), rel=1e-6)
        assert r[u]["rate"] == pytest.approx(float((a[:, u] > 0).double().mean()), rel=1e-6)
        mx = a[:, u].flatten(1).max(1).values
        assert r[u]["max_mean"] == pytest.approx(float(mx.mean()), rel=1e-6)
        assert r[u]["max_max"] == pytest.approx(float(mx.max()), rel=1e-6)
        assert r[u]["images"] == 13 and r[u]["positions"] == 30
        med = np.quantile(mx.numpy(), 0.5, method="inverted_cdf")
        assert abs(r[u]["quantiles"]["0.5"] - med) <= r[u]["sketch_bin_width"] * 1.000001
    # the state has a fixed size per unit, whatever the number of images
    sizes = {k: tuple(t.shape) for k, t in s.state_dict()["sketch"].items() if torch.is_tensor(t)}
    assert sizes["counts"] == (4, BINS)
