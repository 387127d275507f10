"""Occlusion maps equal an independent naive loop (copy the image, paint the square, forward, read
the outputs) on architectures the incremental path was not written against, and Captum's
``Occlusion`` attribution rebuilt from ``prob_target`` (Zeiler & Fergus 2014, Section 4.2)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from convlens_occlusion import (
    OcclusionFallbackWarning,
    OcclusionGrid,
    UnsupportedModel,
    occlusion_maps,
)
from torch import nn

from convlens import record
from convlens.errors import ConvlensError
from convlens.testing import tiny_model

TOL = 1e-5  # relative to the largest value of each map (Section "Exact" of the issue)


# -- models the incremental path has not seen ---------------------------------------------------


class OddNet(nn.Module):
    """Borders and padding in every flavour: dilated and 'same' convolutions, a non-square
    stride, padded and ceil-mode max pooling, padded and ceil-mode average pooling, eval-mode
    BatchNorm, GELU, a residual sum, ``x.view(n, -1)`` and a non-square input."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, stride=(2, 1), padding=(1, 2), dilation=(1, 2))
        self.bn = nn.BatchNorm2d(6)
        self.p1 = nn.MaxPool2d(3, 2, padding=1, ceil_mode=True)
        self.c2 = nn.Conv2d(6, 6, 3, padding="same", dilation=2)
        self.a1 = nn.AvgPool2d(3, 1, padding=1)
        self.c3 = nn.Conv2d(6, 8, 2, stride=2)
        self.a2 = nn.AvgPool2d(2, ceil_mode=True)
        self.fc = nn.Linear(8 * 2 * 4, 4)

    def forward(self, x):
        x = self.p1(F.gelu(self.bn(self.c1(x))))
        x = x + self.a1(torch.relu(self.c2(x)))
        x = self.a2(self.c3(x))
        return self.fc(x.view(x.size(0), -1))


class MeanImageNet(nn.Module):
    """Section 3's per-pixel mean subtraction inside ``forward`` (as the zeiler-fergus recipe's
    probe model does): element-wise ops with constant maps of the input's size."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean_image", torch.rand(3, 20, 24))
        self.register_buffer("gain", torch.rand(1, 1, 20, 24) + 0.5)
        self.conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        x = (x - self.mean_image).mul(self.gain)
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


class DenseNet(nn.Module):
    """A dense block (DenseNet): each layer reads the channel concatenation of all earlier
    maps, whose changed boxes differ in size; pre-activation BatchNorm on the concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.bns = nn.ModuleList(nn.BatchNorm2d(4 + 3 * k) for k in range(3))
        self.convs = nn.ModuleList(nn.Conv2d(4 + 3 * k, 3, 3, padding=1) for k in range(3))
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(13, 5)

    def forward(self, x):
        feats = [self.stem(x)]
        for bn, conv in zip(self.bns, self.convs, strict=True):
            feats.append(conv(torch.relu(bn(torch.cat(feats, 1)))))
        y = self.pool(torch.cat(feats, 1))
        return self.fc(y.mean((2, 3)))


class NextNet(nn.Module):
    """ConvNeXt's block: a depthwise 7×7 convolution, then channels last in the shape
    (``permute``), LayerNorm over channels, a ``Linear`` MLP with GELU, back to channels first,
    a per-channel scale and a residual sum; the stem's LayerNorm2d the same way."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, stride=2)
        self.stem_norm = nn.LayerNorm(8)
        self.dw = nn.Conv2d(8, 8, 7, padding=3, groups=8)
        self.norm = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.gamma = nn.Parameter(torch.rand(8) + 0.5)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        x = F.layer_norm(x.permute(0, 2, 3, 1), (8,), self.stem_norm.weight,
                         self.stem_norm.bias).permute(0, 3, 1, 2)  # fmt: skip
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(self.norm(y)))).permute(0, 3, 1, 2)
        x = x + y.mul(self.gamma.reshape(1, -1, 1, 1))
        return self.head(x.mean((2, 3)))


class ControlFlowNet(nn.Module):
    """Data-dependent control flow in ``forward``: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.conv(x)
        if float(y.mean()) > 1e9:  # never true; still untraceable
            y = -y
        return self.fc(y.mean((2, 3)))


class InplaceAliasNet(nn.Module):
    """An in-place ReLU whose input is read again afterwards (eager semantics: the later read
    sees the rectified values)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        y = self.conv(x)
        z = torch.relu_(y)
        both = torch.cat([z.mean((2, 3)), y.amax((2, 3))], 1)
        return self.fc(both)


def _seed(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / max(1, p[0].numel()) ** 0.5)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def _zfnet(inplace: bool = False):
    from convlens.models import ZFNet, ZFNetConfig

    cfg = ZFNetConfig(input_size=96, width_mult=0.25, num_classes=10, init="kaiming",
                      relu_inplace=inplace)  # fmt: skip
    torch.manual_seed(0)
    return ZFNet(cfg).eval(), (1, 3, 96, 96)


def _timm(name: str, size: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from convlens.models import create_model

        torch.manual_seed(0)
        return create_model(name), (1, 3, size, size)


# name -> (factory, window, stride, layer or None (the default: top conv layer), images)
MODELS = {
    "tiny-chain": (lambda: tiny_model("chain"), 7, 3, None, 2),
    "tiny-functional": (lambda: tiny_model("functional"), 6, 4, None, 2),
    "tiny-reused": (lambda: tiny_model("reused"), 5, 2, "relu:1", 2),
    "tiny-resnet-se": (lambda: tiny_model("resnet"), 8, 3, None, 2),
    "oddnet": (lambda: (_seed(OddNet()), (1, 3, 21, 27)), 6, 4, "c2", 2),
    "mean-image": (lambda: (_seed(MeanImageNet()), (1, 3, 20, 24)), 5, 3, "conv", 2),
    "dense-block": (lambda: (_seed(DenseNet()), (1, 3, 24, 24)), 5, 3, "convs.2", 2),
    "zfnet-96-inplace": (lambda: _zfnet(inplace=True), 16, 10, "conv5", 1),
    "timm-densenet121-64": (lambda: _timm("densenet121", 64), 16, 12, None, 1),
    "next-block": (lambda: (_seed(NextNet()), (1, 3, 32, 28)), 6, 4, "dw", 2),
    "timm-convnext_tiny-64": (lambda: _timm("convnext_tiny", 64), 16, 12, None, 1),
    "timm-resnet18-64": (lambda: _timm("resnet18", 64), 16, 12, "layer3.1.act2", 1),
    "timm-efficientnet_lite0-64": (
        lambda: _timm("efficientnet_lite0", 64),
        16,
        12,
        "blocks.5.0.bn2.act",
        1,
    ),
}


def naive(model, x, grid: OcclusionGrid, fill, layer, channel):
    """The reference: one full forward per position of a painted copy."""
    logits, feats = [], []
    fill_t = torch.as_tensor(fill, dtype=x.dtype).view(-1, 1, 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batch-1 forwards of small models: threads only add overhead
    try:
        with torch.no_grad():
            for x0, y0, x1, y1 in grid.boxes():
                occluded = x.clone()
                occluded[:, :, y0:y1, x0:x1] = fill_t
                with record(model, [layer], switches=False, trace=False,
                            functional="/" in layer) as r:  # fmt: skip
                    logits.append(model(occluded)[0].double())
                feats.append(r[layer][0, channel].double().sum())
    finally:
        torch.set_num_threads(threads)
    return torch.stack(logits), torch.stack(feats)


def _rel(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.fixture(scope="module", params=list(MODELS))
def case(request):
    factory, window, stride, layer, n = MODELS[request.param]
    model, shape = factory()
    x = torch.randn(n, *shape[1:], generator=torch.Generator().manual_seed(1))
    return {"name": request.param, "model": model, "x": x, "window": window, "stride": stride,
            "layer": layer, "naive": {}}  # fmt: skip


FILL = (0.25, -0.5, 0.1)


@pytest.mark.parametrize("method", ["incremental", "batched"])
def test_maps_equal_a_naive_loop(case, method):
    name, model, x = case["name"], case["model"], case["x"]
    res = occlusion_maps(model, x, window=case["window"], stride=case["stride"], fill=FILL,
                         layer=case["layer"], method=method, return_logits=True)  # fmt: skip
    assert res.path["method"] == method
    if name == "oddnet" and method == "batched":  # x.view rejects channels-last maps
        assert res.path["batched_layout"] == "contiguous"
    if method == "incremental":  # the incremental path really skipped work somewhere
        assert any(r["mode"] == "patch" for r in res.path["layers"]), res.path["layers"]
        if name.startswith(("timm", "tiny-resnet")) and "convnext" not in name:  # BN folded
            assert res.path["folded_batchnorms"] > 0
    rows, cols = res.grid.shape
    for i in range(x.shape[0]):
        key = (i, res.layer, int(res.channels[i]))
        if key not in case["naive"]:  # shared by both methods
            case["naive"][key] = naive(model, x[i : i + 1], res.grid, FILL, *key[1:])
        logits, feats = case["naive"][key]
        ours = torch.as_tensor(res.logits[i]).reshape(rows * cols, -1)
        assert _rel(ours, logits) <= TOL, f"{name}: logits"
        probs = logits.softmax(1)[:, int(res.targets[i])]
        assert _rel(res.prob_target[i].reshape(-1), probs) <= TOL, f"{name}: prob_target"
        assert _rel(res.feature_activity[i].reshape(-1), feats) <= TOL, f"{name}: feature"
        # top class equal wherever the naive top-2 are not tied within the tolerance
        top2 = logits.topk(2, 1).values
        clear = (top2[:, 0] - top2[:, 1]) > 1e-4 * logits.abs().max()
        top = torch.as_tensor(res.top_class[i]).reshape(-1)
        assert torch.equal(top[clear], logits.argmax(1)[clear]), f"{name}: top_class"


def test_concatenations_run_on_patches():
    model = _seed(DenseNet())
    x = torch.randn(1, 3, 24, 24, generator=torch.Generator().manual_seed(2))
    res = occlusion_maps(model, x, window=5, stride=3, layer="convs.2", method="incremental",
                         full_above=1.0)  # fmt: skip
    cats = [(r["op"], r["mode"]) for r in res.path["layers"] if r["node"].startswith("cat")]
    assert cats == [("cat", "patch")] * 4, res.path["layers"]


def test_channels_last_blocks_run_on_patches():
    model = _seed(NextNet())
    x = torch.randn(1, 3, 32, 28, generator=torch.Generator().manual_seed(2))
    res = occlusion_maps(model, x, window=6, stride=4, layer="dw", method="incremental",
                         full_above=1.0)  # fmt: skip
    full = [r["node"] for r in res.path["layers"] if r["mode"] == "full"]
    assert full == [], res.path["layers"]  # every map-shaped layer, NHWC ones included
    ops = {r["op"] for r in res.path["layers"]}
    assert {"permute", "pointwise", "local", "union"} <= ops


def test_per_pixel_constant_maps_are_cropped_not_run_in_full():
    model = _seed(MeanImageNet())
    x = torch.randn(1, 3, 20, 24, generator=torch.Generator().manual_seed(2))
    res = occlusion_maps(model, x, window=5, stride=3, layer="conv", method="incremental")
    modes = {r["node"].split(" ")[0]: (r["op"], r["mode"]) for r in res.path["layers"]}
    assert modes["sub"] == ("pointwise_map", "patch"), res.path["layers"]
    assert modes["mul"] == ("pointwise_map", "patch"), res.path["layers"]
    assert modes["conv"][1] == "patch"


def test_captum_occlusion_matches_the_prob_map():
    from captum.attr import Occlusion

    for model, shape, window, stride in (
        (*tiny_model("chain"), 7, 3),
        (_seed(OddNet()), (1, 3, 21, 27), 6, 4),
    ):
        x = torch.randn(1, *shape[1:], generator=torch.Generator().manual_seed(3))
        res = occlusion_maps(model, x, window=window, stride=stride, fill=0.0)
        t = int(res.targets[0])
        with torch.no_grad():
            attr = Occlusion(lambda inp, m=model: m(inp).softmax(1)).attribute(
                x, sliding_window_shapes=(3, window, window), strides=(3, stride, stride),
                baselines=0.0, target=t, perturbations_per_eval=16,
            )[0, 0].double()  # fmt: skip
        p0 = float(res.prob_orig[0])
        total = torch.zeros(shape[-2:], dtype=torch.float64)
        count = torch.zeros(shape[-2:], dtype=torch.float64)
        for (x0, y0, x1, y1), p in zip(res.grid.boxes(), res.prob_target[0].reshape(-1),
                                       strict=True):  # fmt: skip
            total[y0:y1, x0:x1] += p0 - float(p)
            count[y0:y1, x0:x1] += 1
        assert bool((count > 0).all())  # stride <= window: every pixel is covered
        assert _rel(total / count, attr) <= 1e-4
        assert float(attr.abs().max()) > 1e-3  # a real signal, not two maps of zeros


def test_grid_is_captums_grid():
    g = OcclusionGrid(30, 23, window=7, stride=4)
    # Captum: ceil((size - window) / stride) + 1 steps, the last square clipped at the border
    assert g.shape == (int(np.ceil(23 / 4)) + 1, int(np.ceil(16 / 4)) + 1)
    boxes = g.boxes()
    assert boxes[:, 2].max() == 23 and boxes[:, 3].max() == 30
    assert (g.coverage() > 0).all()
    with pytest.raises(ConvlensError, match="window"):
        OcclusionGrid(10, 10, window=11, stride=1)
    with pytest.raises(ConvlensError, match="stride"):
        OcclusionGrid(10, 10, window=3, stride=0)


def test_untraceable_model_falls_back_and_says_why():
    model = _seed(ControlFlowNet())
    x = torch.randn(1, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    with pytest.warns(OcclusionFallbackWarning, match="torch.fx"):
        res = occlusion_maps(model, x, window=4, stride=4, layer="conv", return_logits=True)
    assert res.path["method"] == "batched"
    assert "torch.fx" in res.path["fallback_reason"]
    logits, _ = naive(model, x, res.grid, 0.0, "conv", int(res.channels[0]))
    assert _rel(torch.as_tensor(res.logits[0]).reshape(len(res.grid), -1), logits) <= TOL
    with pytest.raises(UnsupportedModel):
        occlusion_maps(model, x, window=4, stride=4, layer="conv", method="incremental")


def test_in_place_write_into_a_value_read_later_is_not_patched():
    model = _seed(InplaceAliasNet())
    x = torch.randn(1, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    with pytest.warns(OcclusionFallbackWarning, match="in place"):
        res = occlusion_maps(model, x, window=4, stride=2, layer="conv", return_logits=True)
    assert res.path["method"] == "batched"
    logits, _ = naive(model, x, res.grid, 0.0, "conv", int(res.channels[0]))
    assert _rel(torch.as_tensor(res.logits[0]).reshape(len(res.grid), -1), logits) <= TOL


def test_no_one_thread_trial_where_every_layer_is_heavy(monkeypatch):
    """Above ``HEAVY_OP_MACS`` multiply-adds per layer and position the sweep keeps torch's
    thread count without a trial batch, says why, and computes the same map."""
    from convlens_occlusion import _cache, _compute

    model, shape = tiny_model("chain")
    x = torch.randn(1, *shape[1:], generator=torch.Generator().manual_seed(4))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _cache.clear(model)
        tuned = occlusion_maps(model, x, window=7, stride=3, batch_size=8)
        assert set(tuned.path["threads"]["incremental"]["tuned_seconds_per_position"]) == {"1", "2"}
        per_op = tuned.path["flops"]["macs_executed"] / len(tuned.path["flops"]["layers"])
        monkeypatch.setattr(_compute, "HEAVY_OP_MACS", per_op)  # this model is now "heavy"
        _cache.clear(model)
        heavy = occlusion_maps(model, x, window=7, stride=3, batch_size=8)
        info = heavy.path["threads"]["incremental"]
        assert info["threads"] == 2 and info["tuned_seconds_per_position"] == {}
        assert "multiply-adds per layer and position" in info["trial_skipped"]
        assert _rel(heavy.prob_target, tuned.prob_target) <= TOL
    finally:
        torch.set_num_threads(before)


def test_bad_arguments_are_errors():
    model, shape = tiny_model("chain")
    x = torch.randn(1, *shape[1:])
    with pytest.raises(ConvlensError, match="method"):
        occlusion_maps(model, x, method="fast")
    with pytest.raises(ConvlensError, match="target"):
        occlusion_maps(model, x, window=8, stride=8, target=99)
    with pytest.raises(ConvlensError, match="channel"):
        occlusion_maps(model, x, window=8, stride=8, channel=999)
    with pytest.raises(ConvlensError, match="not found"):
        occlusion_maps(model, x, window=8, stride=8, layer="features.nope")


def test_thread_choice_is_recorded_and_restored():
    model, shape = tiny_model("chain")
    x = torch.randn(1, *shape[1:], generator=torch.Generator().manual_seed(4))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        tuned = occlusion_maps(model, x, window=7, stride=3, batch_size=8)
        assert torch.get_num_threads() == 2  # restored after the sweep
        info = tuned.path["threads"]["incremental"]
        assert set(info["tuned_seconds_per_position"]) == {"1", "2"}
        assert info["threads"] in (1, 2)
        fixed = occlusion_maps(model, x, window=7, stride=3, batch_size=8, threads=1)
        assert fixed.path["threads"]["incremental"] == {
            "threads": 1, "tuned_seconds_per_position": {},
        }  # fmt: skip
        assert _rel(tuned.prob_target, fixed.prob_target) <= TOL
    finally:
        torch.set_num_threads(before)
