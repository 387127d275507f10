"""Shared helpers for the model tests: recording every named module's output shape."""

from __future__ import annotations

import pytest
import torch
from torch import nn


def record_shapes(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Run ``model(x)`` with a forward hook on every named module; return name → output shape
    without the batch dimension. Hooks are removed even if the forward fails."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    try:
        for name, module in model.named_modules():
            if name:
                handles.append(
                    module.register_forward_hook(
                        lambda _m, _i, out, name=name: shapes.__setitem__(
                            name, tuple(out.shape[1:])
                        )
                    )
                )
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return shapes


@pytest.fixture
def shapes_of():
    return record_shapes
