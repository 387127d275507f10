"""Receptive fields: the analytic rule against the gradient support of single units."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convlens.engine import ReceptiveField, trace_model
from convlens.engine.receptive import conv_like, union


def _support(model: nn.Module, layer: str, y: int, x: int, size: int) -> tuple[int, int, int, int]:
    """Box of input pixels with non-zero gradient for one unit: an independent reference.

    All weights are positive and inputs positive, so no path cancels and ReLUs pass everything;
    max-poolings are swapped for average poolings of the same geometry (the same field, but a
    gradient to every pixel of the window rather than to the argmax only).
    """
    import copy

    model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.MaxPool2d):
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(
                parent,
                name.rpartition(".")[2],
                nn.AvgPool2d(m.kernel_size, m.stride, m.padding, m.ceil_mode),
            )
    acts = {}
    mod = dict(model.named_modules())[layer]
    h = mod.register_forward_hook(lambda m, i, o: acts.__setitem__("a", o))
    inp = torch.ones(1, 3, size, size, requires_grad=True)
    model(inp)
    h.remove()
    acts["a"][0, 0, y, x].backward()
    nz = inp.grad[0].abs().sum(0).nonzero()
    return (
        int(nz[:, 1].min()),
        int(nz[:, 0].min()),
        int(nz[:, 1].max()) + 1,
        int(nz[:, 0].max()) + 1,
    )


def _positive(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.rand_like(p) * 0.1 + 0.01)
    return model.eval()


def test_rules_by_hand():
    rf = conv_like(ReceptiveField.identity(), 7, 2, 1)  # zfnet conv1
    assert (rf.size, rf.stride, rf.start) == ((7, 7), (2, 2), (-1, -1))
    rf = conv_like(rf, 3, 2, 0)  # pool1
    assert (rf.size, rf.stride, rf.start) == ((11, 11), (4, 4), (-1, -1))
    dil = conv_like(ReceptiveField.identity(), 3, 1, 2, dilation=2)
    assert dil.size == (5, 5) and dil.start == (-2, -2)
    u = union([ReceptiveField((3, 3), (1, 1), (0, 0)), ReceptiveField((5, 5), (2, 2), (-2, -2))])
    assert (u.size, u.stride, u.start) == ((5, 5), (2, 2), (-2, -2))
    assert rf.box(2, 3) == (-1 + 12, -1 + 8, -1 + 12 + 11, -1 + 8 + 11)
    assert rf.box(0, 0, clip_to=(224, 224)) == (0, 0, 10, 10)


@pytest.mark.parametrize(
    "layers",
    [
        [
            nn.Conv2d(3, 2, 5, stride=2, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(2, 2, 3, padding=1),
        ],
        [
            nn.Conv2d(3, 2, 3, dilation=2, padding=2),
            nn.AvgPool2d(2),
            nn.Conv2d(2, 2, (3, 5)),
            nn.ReLU6(),
        ],
        [
            nn.Conv2d(3, 2, 3, stride=2),
            nn.BatchNorm2d(2),
            nn.Conv2d(2, 2, 3, groups=2),
            nn.MaxPool2d(2, 2, padding=1),
        ],
    ],
)
def test_chain_fields_equal_gradient_support(layers):
    model = _positive(nn.Sequential(*layers))
    last = str(len(layers) - 1)
    rf = trace_model(model, torch.zeros(1, 3, 48, 48)).rf(last)
    for y, x in [(2, 3), (4, 4)]:
        assert rf.box(y, x, clip_to=(48, 48)) == _support(model, last, y, x, 48)


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 2, 3, padding=1)
        self.b = nn.Conv2d(2, 2, 3, padding=1)
        self.c = nn.Conv2d(2, 2, 3, padding=1)
        self.out = nn.Identity()

    def forward(self, x):
        x = F.avg_pool2d(self.a(x), 2)
        return self.out(x + self.c(self.b(x)))


def test_residual_union_equals_gradient_support():
    model = _positive(_Residual())
    rf = trace_model(model, torch.zeros(1, 3, 40, 40)).rf("out")
    # longest path a → pool → b → c: 3, then +1 (pool 2x2), then +2·2 twice (3x3 at stride 2)
    assert rf.size == (12, 12)
    assert rf.box(5, 6, clip_to=(40, 40)) == _support(model, "out", 5, 6, 40)


def test_global_after_flatten_and_squeeze_excitation_gate_ignored():
    from convlens.testing import TinyResNet

    rec = trace_model(TinyResNet().eval(), torch.zeros(1, 3, 32, 32))
    assert rec.rf("head").is_global
    # the SE gate's 1x1 global field must not make the block's field global
    add = rec.rf("/add")
    assert not add.is_global and add.size == (3 + 2 * 2, 3 + 2 * 2)
