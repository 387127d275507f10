"""A convolution whose kernel covers its input, run as a matrix product, against ``F.conv2d``;
the engine's inference passes use it (VGG's fully connected layers)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from convlens.engine import record, trace_model, traced_pass
from convlens.engine.linear_convs import ConvAsLinear, LinearConv, covers_input


class _Count(TorchFunctionMode):
    """Counts the convolutions and matrix products that reach it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_shapes: list[tuple[int, ...]] = []
        self.linears = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.conv2d:
            self.conv_shapes.append(tuple(args[1].shape))
        elif func is F.linear:
            self.linears += 1
        return func(*args, **(kwargs or {}))


class _VggLike(nn.Module):
    """VGG's shape in small: convolutions, max pooling, then timm's ``ConvMlp`` (a kernel that
    covers the 4x4 map, then a 1x1 kernel on the 1x1 map) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Conv2d(6, 16, 4)
        self.fc2 = nn.Conv2d(16, 12, 1)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        x = self.pool(F.relu(self.conv(x)))
        x = F.relu(self.fc2(F.relu(self.fc1(x))))
        return self.head(x.flatten(1))


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "padding", "dilation", "groups", "covers"),
    [
        ((2, 6, 4, 4), (16, 6, 4, 4), 0, 1, 1, True),
        ((2, 6, 1, 1), (16, 6, 1, 1), 0, 1, 1, True),
        ((2, 6, 5, 3), (16, 6, 5, 3), "valid", 1, 1, True),
        ((2, 6, 4, 4), (16, 6, 3, 3), 0, 1, 1, False),  # output 2x2
        ((2, 6, 4, 4), (16, 6, 4, 4), 1, 1, 1, False),  # padded: output 3x3
        ((2, 6, 5, 5), (16, 6, 5, 5), "same", 1, 1, False),
        ((2, 6, 4, 4), (16, 3, 4, 4), 0, 1, 2, False),  # grouped
        (
            (2, 6, 5, 5),
            (16, 6, 3, 3),
            0,
            2,
            1,
            False,
        ),  # dilated: covers 5x5, yet not a plain product
    ],
)
def test_covers_input_and_the_product_equal_conv2d(x_shape, w_shape, padding, dilation, groups,
                                                   covers):  # fmt: skip
    g = torch.Generator().manual_seed(0)
    x, w, b = (
        torch.randn(x_shape, generator=g),
        torch.randn(w_shape, generator=g),
        torch.randn(w_shape[0], generator=g),
    )
    assert covers_input(x, w, padding, dilation, groups) is covers
    ref = F.conv2d(x, w, b, padding=padding, dilation=dilation, groups=groups)
    if covers:
        got = LinearConv(w.reshape(w.shape[0], -1), b)(x)
        assert got.shape == ref.shape == (x_shape[0], w_shape[0], 1, 1)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_the_mode_runs_only_covering_convolutions_as_products():
    model = _VggLike().eval()
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
        with _Count() as count, ConvAsLinear():
            got = model(x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert count.conv_shapes == [(6, 3, 3, 3)]  # only the 3x3 convolution is one still
    assert count.linears == 3  # fc1, fc2 and the head


@pytest.mark.parametrize("which", ["traced_pass", "trace_model"])
def test_engine_passes_run_covering_convolutions_as_products(which):
    """The trace is the ordinary recording's (names, shapes, receptive fields) and the output
    the model's, but the covering convolutions never reach ``conv2d``."""
    model = _VggLike().eval()
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), record(model, switches=True, trace=True) as ref:
        expected = model(x)
    with _Count() as count:
        if which == "traced_pass":
            rec, out = traced_pass(model, x)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        else:
            rec = trace_model(model, x)
    assert count.conv_shapes == [(6, 3, 3, 3)]
    assert [(c.name, c.output_shape, c.rf) for c in rec.trace] == [
        (c.name, c.output_shape, c.rf) for c in ref.trace
    ]
