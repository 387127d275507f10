"""The tiny test convnets (see the package docstring)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TinyChainNet", "FunctionalNet", "ReusedModuleNet", "TinyResNet", "tiny_model"]


def _seeded(module: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 / max(1, p[0].numel()) ** 0.5))
    return module.eval()


class TinyChainNet(nn.Module):
    """A 3-conv Zeiler & Fergus-style chain on 32×32 inputs: conv 5×5/2 → relu → max-pool 3×3/2
    (overlapping, ceil mode) → LRN → conv 3×3 → relu → max-pool → conv 3×3 → relu → fc.
    ``convlens_aliases`` name the rectified maps ``conv1``…``conv3`` like zfnet's."""

    def __init__(self, num_classes: int = 5, inplace: bool = False, lrn: bool = True) -> None:
        super().__init__()
        layers: list[tuple[str, nn.Module]] = [
            ("conv1", nn.Conv2d(3, 8, 5, stride=2, padding=1)),
            ("relu1", nn.ReLU(inplace=inplace)),
            ("pool1", nn.MaxPool2d(3, 2, ceil_mode=True)),
        ]
        if lrn:
            layers.append(("norm1", nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)))
        layers += [
            ("conv2", nn.Conv2d(8, 12, 3, padding=1)),
            ("relu2", nn.ReLU(inplace=inplace)),
            ("pool2", nn.MaxPool2d(3, 2)),
            ("conv3", nn.Conv2d(12, 16, 3, padding=1)),
            ("relu3", nn.ReLU(inplace=inplace)),
        ]
        from collections import OrderedDict

        self.features = nn.Sequential(OrderedDict(layers))
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(16 * 3 * 3, num_classes)
        self.convlens_aliases = {
            "conv1": "features.relu1",
            "conv2": "features.relu2",
            "conv3": "features.relu3",
            "logits": "fc",
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.features(x)))


class FunctionalNet(nn.Module):
    """Convolutions as modules, everything else functional in ``forward``: ``F.relu``,
    ``F.max_pool2d`` (3×3/2, padding 1), ``torch.flatten``. Inputs 3×32×32."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 3, 2, padding=1)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(torch.flatten(x, 1))


class ReusedModuleNet(nn.Module):
    """One in-place ``nn.ReLU`` and one ``nn.MaxPool2d`` called at two places each (as in
    torchvision's ResNet blocks). Inputs 3×16×16."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        return self.fc(x.flatten(1))


class TinyResNet(nn.Module):
    """Stem conv + BatchNorm + ReLU6, a residual block with a depthwise 3×3 conv, a
    squeeze-and-excitation gate, global average pooling. Inputs 3×32×32."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU6()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn_dw = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 8, 1)
        self.se = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn(self.stem(x)))
        y = F.relu6(self.bn_dw(self.dw(x)))
        y = self.pw(y)
        y = y * torch.sigmoid(self.se(y.mean((2, 3), keepdim=True)))
        x = x + y
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


_FACTORIES = {
    "chain": TinyChainNet,
    "functional": FunctionalNet,
    "reused": ReusedModuleNet,
    "resnet": TinyResNet,
}
_INPUTS = {"chain": 32, "functional": 32, "reused": 16, "resnet": 32}


def tiny_model(kind: str = "chain", seed: int = 0, **kwargs) -> tuple[nn.Module, torch.Size]:
    """A seeded tiny model in eval mode and its input shape ``(1, 3, H, W)``."""
    model = _seeded(_FACTORIES[kind](**kwargs), seed)
    if isinstance(model, TinyResNet):  # give BatchNorm non-trivial statistics
        g = torch.Generator().manual_seed(seed + 1)
        for bn in (model.bn, model.bn_dw):
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
    size = _INPUTS[kind]
    return model, torch.Size((1, 3, size, size))


def tiny_probe_model(kind: str = "chain", seed: int = 0, **kwargs) -> nn.Module:
    """:func:`tiny_model` with the ``convlens_info`` a probe reads (name, 5 classes, its input
    size, random weights): ready for ``convlens.run_probe(name, model, ...)``."""
    from convlens.models import ModelInfo

    model, shape = tiny_model(kind, seed, **kwargs)
    model.convlens_info = ModelInfo(
        name=f"tiny-{kind}", family="test", weights="random", random_init=True, num_classes=5,
        input_size=tuple(shape[1:]),
    )  # fmt: skip
    return model
