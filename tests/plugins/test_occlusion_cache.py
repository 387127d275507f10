"""Occlusion's fixed costs (tracing, the check against the eager model, the thread choice) are
paid once per model and input size within a process, and never at the price of a stale result:
maps of later calls and of every image of a run equal a naive loop, also after the weights
change in place."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.fx
from convlens_occlusion import occlusion_maps
from convlens_occlusion._cache import clear

from tests.plugins.test_occlusion_exact import TOL, OddNet, _rel, _seed, naive


@pytest.fixture
def counts(monkeypatch):
    """How often torch.fx traced something, counted at torch.fx itself."""
    n = {"trace": 0}
    original = torch.fx.Tracer.trace

    def counting(self, *args, **kwargs):
        n["trace"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.fx.Tracer, "trace", counting)
    return n


def _eager_calls(model):
    calls = {"n": 0}

    def hook(*_):
        calls["n"] += 1

    return calls, model.register_forward_hook(hook)


def _check(model, x, res, fill=0.0):
    rows, cols = res.grid.shape
    for i in range(x.shape[0]):
        logits, feats = naive(model, x[i : i + 1], res.grid, fill, res.layer,
                              int(res.channels[i]))  # fmt: skip
        ours = torch.as_tensor(res.logits[i]).reshape(rows * cols, -1)
        assert _rel(ours, logits) <= TOL
        assert _rel(res.feature_activity[i].reshape(-1), feats) <= TOL


def test_second_call_does_not_trace_or_check_again(counts):
    model = _seed(OddNet())
    x = torch.randn(2, 3, 21, 27, generator=torch.Generator().manual_seed(5))
    calls, handle = _eager_calls(model)
    try:
        first = occlusion_maps(model, x, window=6, stride=4, layer="c2", method="incremental",
                               threads=1, return_logits=True)  # fmt: skip
        traced, eager = counts["trace"], calls["n"]
        assert traced >= 1 and eager >= 1
        second = occlusion_maps(model, x, window=6, stride=4, layer="c2", method="incremental",
                                threads=1, return_logits=True)  # fmt: skip
        assert counts["trace"] == traced  # no new torch.fx trace
        assert calls["n"] == eager  # no eager forward: the graph was checked once
    finally:
        handle.remove()
    assert first.path["cached"] == {"trace": False, "validate": False}
    assert second.path["cached"]["trace"] and second.path["cached"]["validate"]
    for res in (first, second):
        assert set(res.phases) >= {"trace", "unoccluded", "sweep", "total"}
        _check(model, x, res)
    assert "validate" in first.phases and "validate" not in second.phases


def test_weights_changed_in_place_are_not_served_from_the_cache(counts):
    model = _seed(OddNet())  # its BatchNorm is folded into c1's weights on the incremental path
    x = torch.randn(1, 3, 21, 27, generator=torch.Generator().manual_seed(6))
    occlusion_maps(model, x, window=6, stride=4, layer="c2", method="incremental", threads=1)
    traced = counts["trace"]
    with torch.no_grad():
        model.bn.running_var.mul_(4.0)
        model.c2.weight.neg_()
    res = occlusion_maps(model, x, window=6, stride=4, layer="c2", method="incremental",
                         threads=1, return_logits=True)  # fmt: skip
    assert counts["trace"] == traced + 1
    assert not res.path["cached"]["trace"]
    _check(model, x, res)


def test_thread_choice_is_reused(monkeypatch):
    model = _seed(OddNet())
    x = torch.randn(1, 3, 21, 27, generator=torch.Generator().manual_seed(7))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a = occlusion_maps(model, x, window=6, stride=2, layer="c2", batch_size=8)
        b = occlusion_maps(model, x, window=6, stride=2, layer="c2", batch_size=8)
    finally:
        torch.set_num_threads(before)
    ta, tb = a.path["threads"]["incremental"], b.path["threads"]["incremental"]
    assert set(ta["tuned_seconds_per_position"]) == {"1", "2"}
    assert tb.get("cached") is True and tb["threads"] == ta["threads"]
    assert tb["tuned_seconds_per_position"] == {}
    assert b.path["cached"]["threads"] and not a.path["cached"]["threads"]


def test_the_cache_does_not_keep_a_model_alive():
    model = _seed(OddNet())
    x = torch.randn(1, 3, 21, 27)
    occlusion_maps(model, x, window=6, stride=6, layer="c2", threads=1)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_clear_forgets(counts):
    model = _seed(OddNet())
    x = torch.randn(1, 3, 21, 27)
    occlusion_maps(model, x, window=6, stride=6, layer="c2", threads=1)
    n = counts["trace"]
    clear(model)
    occlusion_maps(model, x, window=6, stride=6, layer="c2", threads=1)
    assert counts["trace"] == n + 1
