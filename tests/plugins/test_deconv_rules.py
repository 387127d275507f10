"""Backward rules of the deconv probe (``deconvnet``, ``guided``, ``gradient``), each checked
against an independent reference: Captum's ``NeuronGuidedBackprop`` on nets of ``nn.ReLU``
modules, plain autograd, and a ReLU6-aware guided backprop written here with module backward
hooks for efficientnet_lite0."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from captum.attr import NeuronGuidedBackprop
from convlens_deconv import Seed, project
from convlens_deconv._general import local_slope
from torch import nn

from convlens.engine import resolve_layer
from convlens.errors import ConvlensError
from convlens.testing import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _module(model: nn.Module, layer: str) -> nn.Module:
    return model.get_submodule(resolve_layer(model, layer).name)


def captum_guided(model: nn.Module, x: torch.Tensor, layer: str, seeds: list[Seed]):
    ng = NeuronGuidedBackprop(model, _module(model, layer))
    out = []
    for s in seeds:
        sel = (s.channel, s.y, s.x) if s.y >= 0 else (s.channel,)
        out.append(ng.attribute(x[s.image : s.image + 1], neuron_selector=sel)[0])
    return torch.stack(out)


def autograd_unit(model: nn.Module, x: torch.Tensor, layer: str, seeds: list[Seed]):
    """d unit / d input with nothing modified: a forward hook keeps the layer's output."""
    module = _module(model, layer)
    out = []
    kept: dict = {}
    for s in seeds:
        kept.clear()
        h = module.register_forward_hook(lambda m, a, o: kept.setdefault("o", o))
        try:
            xi = x[s.image : s.image + 1].clone().requires_grad_(True)
            model(xi)
        finally:
            h.remove()
        o = kept["o"]
        unit = o[0, s.channel, s.y, s.x] if s.y >= 0 else o[0, s.channel]
        (g,) = torch.autograd.grad(unit, xi)
        out.append(g[0])
    return torch.stack(out)


def quiet(name: str, **kwargs) -> nn.Module:
    from convlens.models import create_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_model(name, **kwargs)


def _strong_seeds(model, x, layer, channels):
    from convlens_deconv import layer_activation

    act = layer_activation(model, x, layer)
    seeds = []
    for i in range(x.shape[0]):
        for c in channels:
            pos = int(act[i, c].argmax())
            seeds.append(Seed(i, c, *divmod(pos, act.shape[-1])))
    return seeds


@pytest.mark.parametrize("method", ["chain", "general"])
def test_guided_equals_captum_guided_backprop_on_a_relu_chain(method):
    model, shape = tiny_model("chain", lrn=False)
    x = torch.randn(3, *shape[1:], generator=torch.Generator().manual_seed(2))
    for layer in ("conv3", "conv2"):
        seeds = _strong_seeds(model, x, layer, range(0, 8, 3))
        ours = project(model, x, layer, seeds, rule="guided", method=method, start="one")
        assert ours.method == method and ours.rule == "guided"
        ref = captum_guided(model, x, layer, seeds)
        assert float(ref.abs().max()) > 0
        assert rel(ours.projections, ref) < 1e-5
        # and it is a different picture from the deconvnet's
        deconv = project(model, x, layer, seeds, rule="deconvnet", method=method, start="one")
        assert rel(deconv.projections, ref) > 0.05


@pytest.mark.parametrize("name", ["zfnet", "alexnet"])
def test_guided_and_gradient_equal_references_on_zfnet_and_alexnet(name):
    model = quiet(name, input_size=112, width_mult=0.25, lrn=False)
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(3))
    seeds = _strong_seeds(model, x, "conv5", range(3))
    for method in ("chain", "general"):
        g = project(model, x, "conv5", seeds, rule="guided", method=method, start="one")
        assert rel(g.projections, captum_guided(model, x, "conv5", seeds)) < 1e-5
        a = project(model, x, "conv5", seeds, rule="gradient", method=method, start="one")
        assert rel(a.projections, autograd_unit(model, x, "conv5", seeds)) < 1e-5


def test_gradient_is_plain_autograd_through_lrn_and_functional_ops():
    for kind, layer in (("chain", "conv3"), ("functional", "conv2"), ("resnet", "/add")):
        kwargs = {"lrn": True} if kind == "chain" else {}
        model, shape = tiny_model(kind, **kwargs)
        x = torch.randn(2, *shape[1:], generator=torch.Generator().manual_seed(4))
        seeds = [Seed(0, 1, 1, 1), Seed(1, 3, 2, 0)]
        ours = project(model, x, layer, seeds, rule="gradient", start="one")
        assert ours.mode == "captum"  # gradient back-propagates through LRN
        if layer.startswith("/"):  # a functional op: autograd through the whole graph by hand
            from convlens.engine import record

            ref = []
            for s in seeds:
                xi = x[s.image : s.image + 1].clone().requires_grad_(True)
                with record(model, [layer], detach=False) as rec:
                    model(xi)
                (gi,) = torch.autograd.grad(rec[layer][0, s.channel, s.y, s.x], xi)
                ref.append(gi[0])
            ref = torch.stack(ref)
        else:
            ref = autograd_unit(model, x, layer, seeds)
        assert rel(ours.projections, ref) < 1e-5


class _GuidedReLU6Hooks:
    """Guided backprop for ReLU6 written independently of convlens: a full backward hook on every
    ``nn.ReLU6`` replaces autograd's ``grad_out * 1[0 < x < 6]`` by its positive part."""

    def __init__(self, model: nn.Module) -> None:
        self.handles = []
        for m in model.modules():
            if isinstance(m, nn.ReLU6):
                m.inplace = False  # full backward hooks cannot see in-place ops
                self.handles.append(
                    m.register_full_backward_hook(lambda mod, gi, go: (gi[0].clamp(min=0),))
                )

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def test_guided_on_efficientnet_lite0_equals_an_independent_relu6_aware_implementation():
    model = quiet("efficientnet_lite0")
    reference = copy.deepcopy(model)
    hooks = _GuidedReLU6Hooks(reference)
    assert len(hooks.handles) == 33
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(8))
    layer = "blocks.2"
    seeds = [Seed(0, 3, 2, 3), Seed(1, 17, 4, 4)]
    ours = project(model, x, layer, seeds, rule="guided", start="one")
    assert ours.method == "general"
    try:
        truth = autograd_unit(reference, x, layer, seeds)
    finally:
        hooks.remove()
    assert float(truth.abs().max()) > 0
    assert rel(ours.projections, truth) < 1e-5
    # guided at ReLU6 depends on the image; the deconvnet's projection of the same unit does not
    a = project(model, x, layer, [Seed(0, 3, 2, 3), Seed(1, 3, 2, 3)], start="one")
    torch.testing.assert_close(a.projections[0], a.projections[1])
    b = project(model, x, layer, [Seed(0, 3, 2, 3), Seed(1, 3, 2, 3)], rule="guided", start="one")
    assert rel(b.projections[0], b.projections[1]) > 0.05


@pytest.mark.parametrize(
    "op,x,expected",
    [
        (nn.ReLU(), [-1.0, 0.5, 7.0], [0.0, 1.0, 1.0]),
        (nn.ReLU6(inplace=True), [-1.0, 0.5, 7.0], [0.0, 1.0, 0.0]),
        (nn.Hardtanh(-2.0, 2.0), [-3.0, 0.0, 3.0], [0.0, 1.0, 0.0]),
        (nn.LeakyReLU(0.1), [-1.0, 2.0], [0.1, 1.0]),
    ],
)
def test_local_slope_is_the_ops_own_derivative(op, x, expected):
    slope = local_slope(op, torch.tensor(x))
    torch.testing.assert_close(slope, torch.tensor(expected))


def test_local_slope_of_silu_is_negative_below_its_minimum():
    x = torch.tensor([-3.0, 0.0, 3.0])
    s = local_slope(nn.SiLU(), x)
    sig = torch.sigmoid(x)
    torch.testing.assert_close(s, sig * (1 + x * (1 - sig)))
    assert s[0] < 0  # the guided gate clips this to zero


def test_unknown_rule_is_a_one_line_error():
    model, shape = tiny_model("chain", lrn=False)
    x = torch.randn(1, *shape[1:])
    with pytest.raises(ConvlensError, match="rule 'guidd'"):
        project(model, x, "conv2", [Seed(0, 0, 0, 0)], rule="guidd")


def test_gather_window_equals_naive_slicing_with_fill_outside():
    from convlens_deconv._chain import gather_window

    g = torch.Generator().manual_seed(0)
    full = torch.randn(3, 4, 9, 7, generator=g)
    rows = torch.tensor([0, 2, 1, 2])
    oy = torch.tensor([-3, 2, 6, 0])
    ox = torch.tensor([1, -2, 4, 5])
    got = gather_window(full, rows, oy, ox, 5, 4, fill=-1.0)
    for s in range(4):
        for i in range(5):
            for j in range(4):
                y, x = int(oy[s]) + i, int(ox[s]) + j
                inside = 0 <= y < 9 and 0 <= x < 7
                want = full[rows[s], :, y, x] if inside else torch.full((4,), -1.0)
                torch.testing.assert_close(got[s, :, i, j], want)
