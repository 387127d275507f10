"""AlexNet as the paper replicated it (Krizhevsky et al. 2012, dense connections)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from convlens.models import AlexNet, AlexNetConfig, ZFNet

ALEXNET_SHAPES = {
    "features.conv1": (96, 55, 55),
    "features.relu1": (96, 55, 55),
    "features.norm1": (96, 55, 55),
    "features.pool1": (96, 27, 27),
    "features.conv2": (256, 27, 27),
    "features.relu2": (256, 27, 27),
    "features.norm2": (256, 27, 27),
    "features.pool2": (256, 13, 13),
    "features.conv3": (384, 13, 13),
    "features.relu3": (384, 13, 13),
    "features.conv4": (384, 13, 13),
    "features.relu4": (384, 13, 13),
    "features.conv5": (256, 13, 13),
    "features.relu5": (256, 13, 13),
    "features.pool5": (256, 6, 6),
    "features": (256, 6, 6),
    "flatten": (9216,),
    "classifier.fc6": (4096,),
    "classifier.relu6": (4096,),
    "classifier.drop6": (4096,),
    "classifier.fc7": (4096,),
    "classifier.relu7": (4096,),
    "classifier.drop7": (4096,),
    "classifier.fc8": (1000,),
    "classifier": (1000,),
}


@pytest.fixture(scope="module")
def alex() -> AlexNet:
    torch.manual_seed(0)
    return AlexNet().eval()


def test_every_stage_shape(alex, shapes_of):
    assert shapes_of(alex, torch.randn(1, 3, 224, 224)) == ALEXNET_SHAPES


def test_names_order_and_geometry(alex):
    names = [n for n, _ in alex.named_modules() if n]
    assert names == [
        "features",
        *[n for n in ALEXNET_SHAPES if n.startswith("features.")],
        "flatten",
        "classifier",
        *[n for n in ALEXNET_SHAPES if n.startswith("classifier.")],
    ]
    f = alex.features
    assert (f.conv1.kernel_size, f.conv1.stride, f.conv1.padding) == ((11, 11), (4, 4), (2, 2))
    assert (f.conv2.kernel_size, f.conv2.stride, f.conv2.padding) == ((5, 5), (1, 1), (2, 2))
    assert all(getattr(f, f"conv{k}").groups == 1 for k in range(1, 6))  # dense, not 2-GPU split
    assert isinstance(alex, ZFNet) and isinstance(alex.config, AlexNetConfig)


def test_aliases_match_zfnet_scheme(alex):
    assert alex.convlens_aliases == ZFNet(width_mult=0.125, input_size=64).convlens_aliases
    modules = dict(alex.named_modules())
    assert all(t in modules for t in alex.convlens_aliases.values())
    for tap in alex.feature_info:
        assert alex.convlens_aliases[tap.alias] == tap.module


def test_removed_layers_3_4_variant(shapes_of):
    """Table 3, "Removed layers 3,4" of the Krizhevsky model."""
    with torch.device("meta"):
        model = AlexNet(conv34=False).eval()
        x = torch.zeros(1, 3, 224, 224)
    shapes = shapes_of(model, x)
    assert shapes["features.relu5"] == (256, 13, 13)
    assert "features.conv3" not in dict(model.named_modules())
    assert set(model.convlens_aliases) == {
        "conv1",
        "conv2",
        "conv5",
        "pool5",
        "fc6",
        "fc7",
        "fc8",
        "logits",
    }


def test_alexnet_config_keeps_its_defaults_through_replace():
    cfg = AlexNetConfig().replace(num_classes=10)
    assert isinstance(cfg, AlexNetConfig) and cfg.conv1_kernel == 11 and cfg.norm_before_pool
    assert AlexNetConfig.from_dict({"num_classes": 3}).conv1_stride == 4
    with torch.device("meta"):
        model = AlexNet(cfg)
    assert sum(isinstance(m, nn.LocalResponseNorm) for m in model.modules()) == 2
