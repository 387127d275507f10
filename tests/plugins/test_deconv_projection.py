"""Deconvnet projections (Section 2.1) checked against independent references: a naive loop for
unpooling, Captum's NeuronDeconvolution for whole projections, autograd for the LRN gradient."""

from __future__ import annotations

import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from captum.attr import NeuronDeconvolution
from convlens_deconv import Seed, choose_method, project, project_strongest, unpool
from convlens_deconv._chain import lrn_vjp
from torch import nn

from convlens.engine import record, resolve_layer
from convlens.errors import ConvlensError
from convlens.testing import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def captum(model: nn.Module, x: torch.Tensor, layer: str, seeds: list[Seed]) -> torch.Tensor:
    """One NeuronDeconvolution call per seed (the reference the batched form must equal)."""
    module = model.get_submodule(resolve_layer(model, layer).name)
    nd = NeuronDeconvolution(model, module)
    out = []
    for s in seeds:
        sel = (s.channel, s.y, s.x) if s.y >= 0 else (s.channel,)
        out.append(nd.attribute(x[s.image : s.image + 1], neuron_selector=sel)[0])
    return torch.stack(out)


def seeds_grid(n_img: int, channels: range, positions) -> list[Seed]:
    return [Seed(i, c, y, x) for i in range(n_img) for c in channels for y, x in positions]


def quiet_model(name: str, **kwargs) -> nn.Module:
    from convlens.models import create_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_model(name, **kwargs)


# ---------------------------------------------------------------------------------------------
# unpooling: scatter-add, not overwrite
# ---------------------------------------------------------------------------------------------


def test_unpool_accumulates_shared_switches_like_a_naive_loop():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 11, 11)
    x[0, 0, 4, 4] = 10.0  # one position wins four overlapping 3x3/2 windows
    _, idx = F.max_pool2d(x, 3, 2, return_indices=True)
    g = torch.rand(idx.shape) + 0.5
    naive = torch.zeros_like(x)
    for n in range(idx.shape[0]):
        for c in range(idx.shape[1]):
            for i in range(idx.shape[2]):
                for j in range(idx.shape[3]):
                    p = int(idx[n, c, i, j])
                    naive[n, c, p // 11, p % 11] += g[n, c, i, j]
    ours = unpool(g, idx, (11, 11))
    torch.testing.assert_close(ours, naive)
    overwrite = F.max_unpool2d(g, idx, 3, 2, output_size=(11, 11))
    assert naive[0, 0, 4, 4] > overwrite[0, 0, 4, 4] + 1.0  # max_unpool2d loses shared signal
    assert float(naive.sum() - overwrite.sum()) > 1.0


def test_lrn_gradient_in_closed_form_matches_autograd():
    torch.manual_seed(1)
    for size in (2, 5):
        x = torch.randn(2, 9, 4, 5) * 4
        g = torch.randn_like(x)
        xr = x.clone().requires_grad_(True)
        (ref,) = torch.autograd.grad(F.local_response_norm(xr, size, 0.3, 0.75, 1.0), xr, g)
        assert rel(lrn_vjp(x, g, size, 0.3, 0.75, 1.0), ref) < 1e-5


# ---------------------------------------------------------------------------------------------
# chain form == general form == Captum
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lrn", [False, True])
@pytest.mark.parametrize("mode", ["paper", "captum"])
def test_chain_and_general_forms_agree_and_match_captum(lrn, mode):
    model, shape = tiny_model("chain", lrn=lrn)
    x = torch.randn(3, *shape[1:], generator=torch.Generator().manual_seed(2))
    for layer in ("conv3", "features.pool2", "conv2"):
        seeds = seeds_grid(3, range(0, 8, 3), [(0, 0), (1, 2), (2, 1)])
        a = project(model, x, layer, seeds, method="chain", mode=mode, start="one")
        b = project(model, x, layer, seeds, method="general", mode=mode, start="one")
        assert (a.method, b.method) == ("chain", "general")
        assert a.projections.shape == (len(seeds), *shape[1:])
        assert rel(a.projections, b.projections) < 1e-5
        ref = captum(model, x, layer, seeds)
        if lrn and mode == "paper":  # the paper skips LRN; Captum back-propagates through it
            assert rel(a.projections, ref) > 0.1
        else:
            assert rel(a.projections, ref) < 1e-5


def _zf_small(name: str) -> nn.Module:
    return quiet_model(name, input_size=112, width_mult=0.25, lrn=False)


@pytest.mark.parametrize("name", ["zfnet", "alexnet"])
def test_zfnet_and_alexnet_projections_equal_captum(name):
    model = _zf_small(name)
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), record(model, ["conv5"], switches=False, trace=False) as rec:
        model(x)
    act = rec["conv5"]
    # the strongest unit of 4 channels in each image, plus one on the border
    seeds = []
    for i in range(2):
        for c in range(4):
            pos = int(act[i, c].argmax())
            seeds.append(Seed(i, c, *divmod(pos, act.shape[-1])))
    seeds.append(Seed(1, 5, 0, act.shape[-1] - 1))
    ours = project(model, x, "conv5", seeds, start="one")
    assert ours.method == "chain"
    ref = captum(model, x, "conv5", seeds)
    assert rel(ours.projections, ref) < 1e-5
    general = project(model, x, "conv5", seeds, start="one", method="general")
    assert rel(ours.projections, general.projections) < 1e-5
    # the paper's form feeds the activation value down: the same projections times that value
    paper = project(model, x, "conv5", seeds)
    scale = ours.activations.clamp(min=0)[:, None, None, None]
    torch.testing.assert_close(paper.projections, ours.projections * scale, rtol=1e-5, atol=1e-12)


def test_geometry_padding_stride_dilation_groups_ceil_mode_and_same_padding():
    """A chain with every geometric option, on a non-square odd input: the projection has the
    input's exact shape and equals Captum (which back-propagates with autograd)."""
    torch.manual_seed(5)
    net = nn.Sequential(
        OrderedDict(
            [
                ("c1", nn.Conv2d(3, 6, 5, stride=2, padding=2)),
                ("r1", nn.ReLU()),
                ("p1", nn.MaxPool2d(3, 2, padding=1, ceil_mode=True)),
                ("c2", nn.Conv2d(6, 8, 3, padding=2, dilation=2, groups=2)),
                ("r2", nn.ReLU()),
                ("p2", nn.MaxPool2d(2, ceil_mode=True)),
                ("c3", nn.Conv2d(8, 8, 4, padding="same")),
                ("r3", nn.ReLU()),
                ("c4", nn.Conv2d(8, 4, 3, stride=2, padding="valid")),
                ("r4", nn.ReLU()),
            ]
        )
    ).eval()
    x = torch.randn(2, 3, 37, 29)
    with torch.no_grad():
        out = net(x)
    h, w = out.shape[-2:]
    seeds = [
        Seed(i, c, y, xx)
        for i in range(2)
        for c in range(4)
        for y, xx in [(0, 0), (h - 1, w - 1), (h // 2, 0)]
    ]
    ours = project(net, x, "r4", seeds, start="one", method="chain")
    assert ours.projections.shape == (len(seeds), 3, 37, 29)
    assert rel(ours.projections, captum(net, x, "r4", seeds)) < 1e-5
    mid = project(net, x, "p2", [Seed(0, 1, 0, 0), Seed(1, 6, 2, 1)], start="one", method="chain")
    assert rel(mid.projections, captum(net, x, "p2", mid.seeds)) < 1e-5


def test_many_seeds_batched_equal_one_by_one():
    model, shape = tiny_model("chain", lrn=False)
    x = torch.randn(4, *shape[1:], generator=torch.Generator().manual_seed(6))
    seeds = seeds_grid(4, range(0, 16, 5), [(0, 0), (2, 2)])
    done: list[int] = []
    both = project(model, x, "conv3", seeds, seed_batch=5, image_batch=3, progress=done.append)
    assert sum(done) == len(seeds) and max(done) <= 5
    for i in (0, 7, len(seeds) - 1):
        one = project(model, x, "conv3", [seeds[i]])
        torch.testing.assert_close(both.projections[i], one.projections[0])


def test_paper_form_is_zero_for_a_unit_with_negative_pre_activation():
    model, shape = tiny_model("chain", lrn=False)
    x = torch.randn(2, *shape[1:], generator=torch.Generator().manual_seed(7))
    with torch.no_grad(), record(model, ["features.conv3"], switches=False, trace=False) as rec:
        model(x)
    act = rec["features.conv3"]
    i, c, y, xx = (int(v) for v in torch.nonzero(act < -0.1)[0])
    seed = [Seed(i, c, y, xx)]
    paper = project(model, x, "features.conv3", seed)
    one = project(model, x, "features.conv3", seed, start="one")
    assert float(paper.activations[0]) < 0
    assert float(paper.projections.abs().max()) == 0.0
    assert float(one.projections.abs().max()) > 0.0


# ---------------------------------------------------------------------------------------------
# every ReLU-family op is rectified, module or functional (where Captum silently is not)
# ---------------------------------------------------------------------------------------------


class _ReLU6AsReLU(nn.ReLU):
    """An ``nn.ReLU`` (so Captum hooks it) computing ReLU6: the independent reference for
    efficientnet_lite0's 33 ``nn.ReLU6`` modules."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(0.0, 6.0)


def _swap_relu6(model: nn.Module) -> int:
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.ReLU6):
                setattr(parent, name, _ReLU6AsReLU())
                n += 1
    return n


def test_relu6_of_efficientnet_lite0_is_rectified():
    import copy

    model = quiet_model("efficientnet_lite0")
    reference = copy.deepcopy(model)
    assert _swap_relu6(reference) == 33
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(8))
    layer = "blocks.2"
    seeds = [Seed(0, 3, 2, 3), Seed(1, 17, 4, 4)]
    ours = project(model, x, layer, seeds, start="one")
    assert ours.method == "general"
    assert ours.modified_ops.get("hardtanh", 0) >= 5  # ReLU6 modules run as F.hardtanh
    truth = captum(reference, x, layer, seeds)
    assert rel(ours.projections, truth) < 1e-5
    silent = captum(model, x, layer, seeds)  # Captum on the real model: plain gradients
    assert rel(silent, truth) > 0.05


class _ModuleTwin(nn.Module):
    """FunctionalNet written with nn.ReLU/nn.MaxPool2d modules (same weights)."""

    def __init__(self, f: nn.Module) -> None:
        super().__init__()
        self.conv1, self.conv2, self.fc = f.conv1, f.conv2, f.fc
        self.r1, self.r2 = nn.ReLU(), nn.ReLU()
        self.p1, self.p2 = nn.MaxPool2d(3, 2, padding=1), nn.MaxPool2d(2)

    def forward(self, x):
        x = self.p1(self.r1(self.conv1(x)))
        x = self.p2(self.r2(self.conv2(x)))
        return self.fc(torch.flatten(x, 1))


def test_functional_relu_is_rectified_in_both_forms():
    model, shape = tiny_model("functional")
    twin = _ModuleTwin(model).eval()
    x = torch.randn(2, *shape[1:], generator=torch.Generator().manual_seed(9))
    seeds = [Seed(0, 1, 1, 2), Seed(1, 5, 3, 0)]
    truth = captum(twin, x, "r2", seeds)
    for method in ("chain", "general"):
        for layer in ("conv2", "/relu:1"):  # a module, and the functional op's own output
            ours = project(model, x, layer, seeds, start="one", method=method)
            assert rel(ours.projections, truth) < 1e-5
    captum_on_functional = captum(model, x, "conv2", seeds)
    assert rel(captum_on_functional, truth) > 0.05


def test_auto_uses_the_chain_up_to_a_residual_add_and_the_general_form_after_it():
    model, shape = tiny_model("resnet")  # conv, BatchNorm, ReLU6, depthwise conv, SE, add
    x = torch.randn(2, *shape[1:], generator=torch.Generator().manual_seed(11))
    seeds = [Seed(0, 0, 1, 1), Seed(1, 5, 7, 2)]
    method, plan, _ = choose_method(model, x, "pw")  # below the add the net is still a chain
    assert method == "chain" and plan is not None
    chain = project(model, x, "pw", seeds, start="one")
    general = project(model, x, "pw", seeds, start="one", method="general")
    assert rel(chain.projections, general.projections) < 1e-5  # BatchNorm folded alike
    method, plan, reason = choose_method(model, x, "/add")
    assert method == "general" and plan is None and "not supported" in reason
    with pytest.raises(ConvlensError, match="chain deconvnet does not apply"):
        project(model, x, "/add", seeds, method="chain")
    out = project(model, x, "/add", seeds)
    assert out.method == "general" and out.reason == reason
    assert out.projections.shape == (2, *shape[1:]) and float(out.projections.abs().max()) > 0


def test_project_strongest_projects_each_images_argmax():
    model, shape = tiny_model("chain", lrn=False)
    x = torch.randn(3, *shape[1:], generator=torch.Generator().manual_seed(10))
    out = project_strongest(model, x, "conv2", channel=4)
    assert out.shape == x.shape
    with torch.no_grad(), record(model, ["conv2"], switches=False, trace=False) as rec:
        model(x)
    act = rec["conv2"][:, 4]
    for i in range(3):
        y, xx = divmod(int(act[i].argmax()), act.shape[-1])
        ref = captum(model, x, "conv2", [Seed(i, 4, y, xx)])[0] * act[i, y, xx]
        assert rel(out[i], ref) < 1e-5


def test_bad_seeds_and_layers_are_one_line_errors():
    model, shape = tiny_model("chain")
    x = torch.randn(1, *shape[1:])
    with pytest.raises(ConvlensError, match="channels"):
        project(model, x, "conv3", [Seed(0, 99, 0, 0)])
    with pytest.raises(ConvlensError, match="outside"):
        project(model, x, "conv3", [Seed(0, 0, 50, 0)])
    with pytest.raises(ConvlensError, match="not found"):
        project(model, x, "conv9", [Seed(0, 0, 0, 0)])
    with pytest.raises(ConvlensError, match="mode"):
        project(model, x, "conv3", [Seed(0, 0, 0, 0)], mode="lrn")
