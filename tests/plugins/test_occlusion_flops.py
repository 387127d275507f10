"""Krypton's theoretical bound (SIGMOD 2019, Section 3.2) and the executor's work, checked
against hand arithmetic on a tiny chain."""

from __future__ import annotations

import pytest
import torch
from convlens_occlusion import occlusion_maps
from torch import nn


class Chain(nn.Module):
    """conv 1→4 (3×3, stride 1, pad 1) on 16×16, conv 4→8 (3×3, stride 2, pad 1) to 8×8, ReLU,
    global average pooling, linear 8→3."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, 1, 1)
        self.c2 = nn.Conv2d(4, 8, 3, 2, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.c2(self.c1(x)))
        return self.fc(self.pool(x).flatten(1))


def test_bound_equals_hand_arithmetic():
    torch.manual_seed(0)
    model = Chain().eval()
    x = torch.randn(1, 1, 16, 16)
    # a 4 px square at stride 4: starts 0, 4, 8, 12 on each axis (16 positions)
    res = occlusion_maps(model, x, window=4, stride=4, layer="c2", method="incremental")
    f = res.path["flops"]
    # multiply-adds per output unit: c1 1·3·3·4 = 36, c2 4·3·3·8 = 288, fc 8·3 = 24
    full = 36 * 16 * 16 + 288 * 8 * 8 + 24
    assert f["macs_full"] == full == 27672
    # c1 (Krypton: interior output patch (4 + 3 − 1) / 1 = 6 rows); rows changed per start:
    # [0,4) → [0,5): 5, [4,8) → [3,9): 6, [8,12) → [7,13): 6, [12,16) → [11,16): 5
    c1 = 36 * (5 + 6 + 6 + 5) ** 2 / 16
    # c2 (stride 2): [0,5) → [0,3): 3, [3,9) → [1,5): 4, [7,13) → [3,7): 4, [11,16) → [5,8): 3
    c2 = 288 * (3 + 4 + 4 + 3) ** 2 / 16
    changed = c1 + c2 + 24  # after global pooling everything changes
    assert f["macs_changed"] == round(changed) == 4641
    assert f["bound"] == pytest.approx(full / changed, abs=1e-3)  # 5.962
    # rows (and columns) fall in two groups by their boxes' extents, (5, 3) at the borders and
    # (6, 4) inside: each group's patches have its own size, so the plan computes exactly the
    # changed units
    assert f["groups"] == 4
    assert f["macs_executed"] == round(changed)
    # with one patch size for all positions, the largest: 6×6 for c1, 4×4 for c2
    one = occlusion_maps(model, x, window=4, stride=4, layer="c2", method="incremental",
                         group_positions=1).path["flops"]  # fmt: skip
    executed = 36 * 36 + 288 * 16 + 24
    assert one["groups"] == 1
    assert one["macs_executed"] == executed
    assert one["planned"] == pytest.approx(full / executed, abs=1e-3)
    assert f["patch_share"] == pytest.approx((36 * 256 + 288 * 64) / full, abs=1e-4)
    kinds = [(r["kind"], r["mode"]) for r in f["layers"]]
    assert kinds == [("conv", "patch"), ("conv", "patch"), ("linear", "full")]


class Gated(nn.Module):
    """A squeeze-excitation gate: the global mean of a changed map changes everywhere, so the
    gated map and all after it change in full (exactly)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 2, 1)
        self.c2 = nn.Conv2d(2, 2, 1)
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        y = self.c1(x)
        y = y * torch.sigmoid(y.mean((2, 3), keepdim=True))
        return self.fc(self.c2(y).mean((2, 3)))


def test_a_gate_makes_the_rest_full():
    torch.manual_seed(0)
    x = torch.randn(1, 1, 8, 8)
    res = occlusion_maps(Gated().eval(), x, window=2, stride=2, layer="c1",
                         method="incremental")  # fmt: skip
    f = res.path["flops"]
    # c1 (1×1, 2 MACs per pixel) changes the 2×2 square only; c2 (4 per pixel) changes in full
    assert f["macs_changed"] == 2 * 4 + 4 * 64 + 4
    assert f["macs_full"] == 2 * 64 + 4 * 64 + 4
