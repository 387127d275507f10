"""ZFNet (Fig. 3 of Zeiler & Fergus 2014) and its ZFNetConfig variants (Table 3)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from convlens.models import ModelConfigError, ZFNet, ZFNetConfig
from convlens.models.zfnet import conv_out_size, pool_out_size

# Fig. 3, at a 224×224 input: every named stage, in order, with its output (C, H, W).
FIG3_SHAPES = {
    "features.conv1": (96, 110, 110),
    "features.relu1": (96, 110, 110),
    "features.pool1": (96, 55, 55),
    "features.norm1": (96, 55, 55),
    "features.conv2": (256, 26, 26),
    "features.relu2": (256, 26, 26),
    "features.pool2": (256, 13, 13),
    "features.norm2": (256, 13, 13),
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

ALIASES = {
    "conv1": "features.relu1",
    "conv2": "features.relu2",
    "conv3": "features.relu3",
    "conv4": "features.relu4",
    "conv5": "features.relu5",
    "pool5": "features.pool5",
    "fc6": "classifier.relu6",
    "fc7": "classifier.relu7",
    "fc8": "classifier.fc8",
    "logits": "classifier.fc8",
}


@pytest.fixture(scope="module")
def zf() -> ZFNet:
    torch.manual_seed(0)
    return ZFNet().eval()


def meta_model(**cfg) -> ZFNet:
    """A shape-only model on the meta device (no memory, no compute)."""
    with torch.device("meta"):
        return ZFNet(**cfg).eval()


def meta_shapes(model: ZFNet, shapes_of, size: int = 224) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        x = torch.zeros(1, model.config.in_chans, size, size)
    return shapes_of(model, x)


def test_every_stage_matches_fig3(zf, shapes_of):
    shapes = shapes_of(zf, torch.randn(1, 3, 224, 224))
    assert shapes == FIG3_SHAPES


def test_module_names_are_the_contract(zf):
    names = [n for n, _ in zf.named_modules() if n]
    assert names == [
        "features",
        *[n for n in FIG3_SHAPES if n.startswith("features.")],
        "flatten",
        "classifier",
        *[n for n in FIG3_SHAPES if n.startswith("classifier.")],
    ]
    assert isinstance(zf.flatten, nn.Flatten)


def test_layer_hyperparameters(zf):
    f = zf.features
    assert (f.conv1.kernel_size, f.conv1.stride, f.conv1.padding) == ((7, 7), (2, 2), (1, 1))
    assert (f.conv2.kernel_size, f.conv2.stride, f.conv2.padding) == ((5, 5), (2, 2), (0, 0))
    for k in (3, 4, 5):
        conv = getattr(f, f"conv{k}")
        assert (conv.kernel_size, conv.padding, conv.groups) == ((3, 3), (1, 1), 1)  # dense
    for k in (1, 2, 5):
        pool = getattr(f, f"pool{k}")
        assert (pool.kernel_size, pool.stride, pool.ceil_mode) == (3, 2, True)
    for k in (1, 2):
        norm = getattr(f, f"norm{k}")
        assert (norm.size, norm.alpha, norm.beta, norm.k) == (5, 1e-4, 0.75, 2.0)
    assert zf.classifier.drop6.p == zf.classifier.drop7.p == 0.5
    assert all(not m.inplace for m in zf.modules() if isinstance(m, nn.ReLU))


def test_aliases_resolve_and_point_at_rectified_maps(zf):
    assert zf.convlens_aliases == ALIASES
    modules = dict(zf.named_modules())
    for alias, target in zf.convlens_aliases.items():
        assert target in modules, alias
        if alias.startswith("conv"):
            assert isinstance(modules[target], nn.ReLU)


def test_feature_info_agrees_with_real_outputs(zf, shapes_of):
    shapes = shapes_of(zf, torch.randn(1, 3, 224, 224))
    assert [t.alias for t in zf.feature_info] == [
        "conv1",
        "conv2",
        "conv3",
        "conv4",
        "conv5",
        "pool5",
    ]
    for tap in zf.feature_info:
        assert shapes[tap.module] == (tap.channels, tap.size, tap.size)
        assert zf.convlens_aliases[tap.alias] == tap.module


def test_paper_init(zf):
    """Section 3: weights N(0, 1e-2²), biases 0."""
    for m in zf.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            assert torch.count_nonzero(m.bias) == 0
            assert abs(m.weight.mean().item()) < 1e-3
    assert zf.features.conv1.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert zf.classifier.fc6.weight.std().item() == pytest.approx(0.01, rel=0.01)


def test_other_init_schemes():
    kaiming = ZFNet(width_mult=0.25, init="kaiming")
    fan_in = 3 * 7 * 7
    assert kaiming.features.conv1.weight.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.1)
    assert ZFNet(width_mult=0.25, init="torch").features.conv1.bias.abs().sum() > 0


def test_relu_not_inplace_keeps_conv_outputs_intact():
    """Captum's hooks need each ReLU's input intact: with the default, conv1's output keeps its
    negative values after the forward; with relu_inplace=True it does not."""
    for inplace, keeps_negatives in ((False, True), (True, False)):
        torch.manual_seed(0)
        model = ZFNet(width_mult=0.125, input_size=64, relu_inplace=inplace).eval()
        kept = {}
        h = model.features.conv1.register_forward_hook(
            lambda m, i, o, kept=kept: kept.setdefault("y", o)
        )
        try:
            with torch.no_grad():
                model(torch.randn(1, 3, 64, 64))
        finally:
            h.remove()
        assert bool((kept["y"] < 0).any()) is keeps_negatives


@pytest.mark.parametrize(
    ("cfg", "expected", "absent"),
    [
        pytest.param(  # Table 3: "Removed layers 3,4"
            {"conv34": False},
            {
                "features.relu2": (256, 26, 26),
                "features.conv5": (256, 13, 13),
                "flatten": (9216,),
                "classifier.fc8": (1000,),
            },
            ["features.conv3", "features.relu3", "features.conv4", "features.relu4"],
            id="no-conv3-4",
        ),
        pytest.param(  # Table 3: "Adjust layers 6,7: 2048 units"
            {"fc_sizes": (2048, 2048)},
            {"classifier.fc6": (2048,), "classifier.fc7": (2048,), "classifier.fc8": (1000,)},
            [],
            id="fc-2048",
        ),
        pytest.param(
            {"fc_sizes": (8192, 8192), "num_classes": 101},
            {"classifier.relu6": (8192,), "classifier.relu7": (8192,), "classifier.fc8": (101,)},
            [],
            id="fc-8192-caltech101",
        ),
        pytest.param(  # "Removed layer 7"
            {"fc_sizes": (4096,)},
            {"classifier.drop6": (4096,), "classifier.fc8": (1000,)},
            ["classifier.fc7", "classifier.relu7", "classifier.drop7"],
            id="no-fc7",
        ),
        pytest.param(  # "Removed layers 6,7"
            {"fc_sizes": ()},
            {"flatten": (9216,), "classifier.fc8": (1000,)},
            ["classifier.fc6", "classifier.fc7", "classifier.relu6", "classifier.drop7"],
            id="no-fc6-7",
        ),
        pytest.param(  # Table 2 (b): layers 3,4,5 of 512,1024,512 maps
            {"conv_channels": (96, 256, 512, 1024, 512)},
            {
                "features.relu3": (512, 13, 13),
                "features.relu4": (1024, 13, 13),
                "features.relu5": (512, 13, 13),
                "features.pool5": (512, 6, 6),
                "flatten": (18432,),
                "classifier.fc6": (4096,),
            },
            [],
            id="wide",
        ),
        pytest.param(
            {"lrn": False},
            {"features.pool1": (96, 55, 55), "features.pool2": (256, 13, 13)},
            ["features.norm1", "features.norm2"],
            id="no-lrn",
        ),
        pytest.param(
            {"width_mult": 0.25},
            {
                "features.relu1": (24, 110, 110),
                "features.relu5": (64, 13, 13),
                "flatten": (2304,),
                "classifier.fc6": (1024,),
                "classifier.fc8": (1000,),
            },
            [],
            id="quarter-width",
        ),
    ],
)
def test_config_variants(cfg, expected, absent, shapes_of):
    model = meta_model(**cfg)
    shapes = meta_shapes(model, shapes_of)
    for name, shape in expected.items():
        assert shapes[name] == shape, name
    modules = dict(model.named_modules())
    for name in absent:
        assert name not in modules
    for alias, target in model.convlens_aliases.items():
        assert target in modules, alias
    removed = {n.split(".")[1].replace("relu", "conv") for n in absent if ".relu" in n}
    removed |= {n.split(".")[1] for n in absent if n.startswith("classifier.fc")}
    assert not removed & set(model.convlens_aliases)
    for tap in model.feature_info:
        assert shapes[tap.module] == (tap.channels, tap.size, tap.size)


def test_small_input_size_sizes_the_classifier():
    model = ZFNet(width_mult=0.125, input_size=64, num_classes=7).eval()
    assert model.convlens_input_size == (3, 64, 64)
    assert [t.size for t in model.feature_info] == [30, 6, 3, 3, 3, 1]
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "padding", "out"),
    [(224, 7, 2, 1, 110), (55, 5, 2, 0, 26), (13, 3, 1, 1, 13), (224, 11, 4, 2, 55)],
)
def test_conv_out_size(size, kernel, stride, padding, out):
    assert conv_out_size(size, kernel, stride, padding) == out
    conv = nn.Conv2d(1, 1, kernel, stride, padding)
    assert conv(torch.zeros(1, 1, size, size)).shape[-1] == out


@pytest.mark.parametrize("size", [3, 4, 5, 6, 13, 26, 27, 55, 110, 111])
def test_pool_out_size_is_ceil_mode(size):
    pool = nn.MaxPool2d(3, 2, ceil_mode=True)
    assert pool_out_size(size) == pool(torch.zeros(1, 1, size, size)).shape[-1]


def test_ceil_mode_is_what_makes_fig3_sizes():
    """Floor-mode pooling would give 54 and 12 where Fig. 3 shows 55 and 13."""
    assert pool_out_size(110) == 55 and (110 - 3) // 2 + 1 == 54
    assert pool_out_size(26) == 13 and (26 - 3) // 2 + 1 == 12


def test_config_validation_and_round_trip():
    with pytest.raises(ModelConfigError, match="fc_sizes"):
        ZFNetConfig().replace(fc_size=(2048, 2048))
    with pytest.raises(ModelConfigError, match="at most 2"):
        ZFNetConfig(fc_sizes=(1, 2, 3))
    with pytest.raises(ModelConfigError, match="5 widths"):
        ZFNetConfig(conv_channels=(96, 256, 384))
    with pytest.raises(ModelConfigError, match="dropout"):
        ZFNetConfig(dropout=1.0)
    with pytest.raises(ModelConfigError, match="init"):
        ZFNetConfig(init="xavier")
    with pytest.raises(ModelConfigError, match="too small"):
        ZFNet(input_size=16)
    with pytest.raises(TypeError):  # ModelConfigError is a TypeError too
        ZFNet(num_clases=10)
    cfg = ZFNetConfig(fc_sizes=[2048, 2048], conv34=False)  # lists arrive from JSON
    assert cfg.fc_sizes == (2048, 2048)
    assert ZFNetConfig.from_dict(cfg.to_dict()) == cfg
    hash(cfg)


def test_reset_classifier_keeps_layers_1_to_7():
    model = ZFNet(width_mult=0.125, input_size=64)
    fc7 = model.classifier.fc7.weight.clone()
    model.reset_classifier(10)
    assert model.num_classes == model.config.num_classes == 10
    assert torch.equal(model.classifier.fc7.weight, fc7)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_renormalize_filters_clips_rms_to_radius():
    model = ZFNet(width_mult=0.125, input_size=64)
    w = model.features.conv1.weight
    with torch.no_grad():
        w[0].fill_(1.0)  # RMS 1 > 0.1: clipped
        w[1].fill_(0.05)  # RMS 0.05: kept
    untouched = model.features.conv2.weight.clone()
    assert model.renormalize_filters_(0.1) == 1
    rms = w.pow(2).mean(dim=(1, 2, 3)).sqrt()
    assert rms[0].item() == pytest.approx(0.1)
    assert rms[1].item() == pytest.approx(0.05)
    assert torch.equal(model.features.conv2.weight, untouched)
