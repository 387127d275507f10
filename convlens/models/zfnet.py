"""ZFNet: the 8-layer convnet of Zeiler & Fergus, "Visualizing and Understanding Convolutional
Networks", ECCV 2014 — Fig. 3 and Section 3, with the Table 3 variants as config options.

Provenance: written from the paper's text (Section 3 "Training Details", the Fig. 3 caption,
Section 4.1, Tables 2 and 3); no third-party code was copied. Where the paper is silent the
choice is stated here, so that every shape of Fig. 3 comes out exactly:

* **conv1** 96 filters 7×7, stride 2 (Section 4.1); padding 1 is our choice, giving 110×110 on
  a 224×224 crop as drawn in Fig. 3. **conv2** 256 filters 5×5, stride 2, no padding → 26×26.
  conv3, conv4 (384) and conv5 (256) are 3×3, stride 1, padding 1 → 13×13, with dense
  connections (Section 3: "sparse connections ... replaced with dense connections").
* **pooling** is max over 3×3 regions with stride 2 (Fig. 3 caption), in *ceil mode* — Caffe's
  output-size rule, ``ceil((n - 3) / 2) + 1``. Fig. 3's sizes need it: 110 → 55 and 26 → 13
  (floor mode would give 54 and 12). pool5: 13 → 6, and 6·6·256 = 9216 inputs to fc6.
* **contrast normalisation** across feature maps after pool1 and pool2 (Fig. 3 caption, (iii);
  Section 2 "local contrast operation"): ``nn.LocalResponseNorm(size=5, alpha=1e-4, beta=0.75,
  k=2)``, the Krizhevsky et al. constants with Caffe's/PyTorch's convention of dividing ``alpha``
  by ``size``.
* **fc6, fc7** 4096 units with ReLU and dropout 0.5 (Section 3), **fc8** C-way (softmax in the
  loss, not in the model: ``forward`` returns logits).
* **init** (Section 3): "All weights are initialized to 10^-2 and biases are set to 0", read as
  weights ~ N(0, 0.01²), biases 0 (``init="paper"``); ``"kaiming"`` and ``"torch"`` are offered
  for training without the paper's hand-annealed schedule.
* **feature scale clipping** (Section 3): :meth:`ZFNet.renormalize_filters_` rescales conv
  filters whose RMS exceeds 0.1, to be called by a training loop after each update.

Module names are a contract (probes, the CLI and the recipe address layers by them)::

    features.{conv1, relu1, pool1, norm1, conv2, relu2, pool2, norm2,
              conv3, relu3, conv4, relu4, conv5, relu5, pool5}
    flatten
    classifier.{fc6, relu6, drop6, fc7, relu7, drop7, fc8}

Removed layers (Table 3) simply have no modules; the remaining ones keep the paper's numbers.
``model.convlens_aliases`` maps ``conv1``…``conv5`` to the rectified maps ``features.reluK``
(what the paper visualises), ``pool5``, ``fc6``/``fc7`` to ``classifier.reluK`` and
``fc8``/``logits`` to ``classifier.fc8``.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from convlens._registry import close_matches
from convlens.models._common import ModelConfigError
from convlens.models._registry import register_model

__all__ = [
    "ZFNet",
    "ZFNetConfig",
    "FeatureInfo",
    "init_weights",
    "conv_out_size",
    "pool_out_size",
    "zfnet",
    "zfnet_wide",
    "zfnet_mini",
]

LayerSpec = tuple[str, nn.Module]
INIT_SCHEMES = ("paper", "kaiming", "torch")


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------


def conv_out_size(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    """Output side of a square convolution: ``floor((size + 2·padding - kernel) / stride) + 1``."""
    return (size + 2 * padding - kernel) // stride + 1


def pool_out_size(size: int, kernel: int = 3, stride: int = 2) -> int:
    """Output side of an unpadded max-pool in ceil mode (Caffe's rule, as ``nn.MaxPool2d(...,
    ceil_mode=True)``): ``ceil((size - kernel) / stride) + 1``."""
    if size < kernel:
        return 0
    out = -(-(size - kernel) // stride) + 1
    if (out - 1) * stride >= size:  # the last window must start inside the input
        out -= 1
    return out


def conv_relu(
    idx: int, in_ch: int, out_ch: int, kernel: int, stride: int, padding: int, inplace: bool
) -> list[LayerSpec]:
    """``conv{idx}`` followed by ``relu{idx}`` (Section 2: "rectified linear function")."""
    return [
        (f"conv{idx}", nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding)),
        (f"relu{idx}", nn.ReLU(inplace=inplace)),
    ]


def overlapping_pool(idx: int) -> LayerSpec:
    """``pool{idx}``: max within 3×3 regions with stride 2, Caffe's ceil mode (Fig. 3)."""
    return f"pool{idx}", nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)


def contrast_norm(idx: int, cfg: ZFNetConfig) -> LayerSpec:
    """``norm{idx}``: contrast normalisation across feature maps (Fig. 3 caption, (iii))."""
    return f"norm{idx}", nn.LocalResponseNorm(
        cfg.lrn_size, alpha=cfg.lrn_alpha, beta=cfg.lrn_beta, k=cfg.lrn_k
    )


def fc_relu_dropout(idx: int, in_f: int, out_f: int, p: float, inplace: bool) -> list[LayerSpec]:
    """``fc{idx}`` → ``relu{idx}`` → ``drop{idx}`` (Section 3: dropout 0.5 on layers 6 and 7)."""
    return [
        (f"fc{idx}", nn.Linear(in_f, out_f)),
        (f"relu{idx}", nn.ReLU(inplace=inplace)),
        (f"drop{idx}", nn.Dropout(p)),
    ]


def init_weights(module: nn.Module, scheme: str = "paper", std: float = 1e-2) -> None:
    """Initialise every ``Conv2d``/``Linear`` of ``module``.

    ``"paper"`` (Section 3): weights ~ N(0, std²) with std = 10⁻², biases 0. ``"kaiming"``:
    He-normal (fan-in, ReLU gain), biases 0. ``"torch"``: leave PyTorch's defaults."""
    if scheme not in INIT_SCHEMES:
        raise ModelConfigError(f"init must be one of {INIT_SCHEMES}, got {scheme!r}")
    if scheme == "torch":
        return
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if scheme == "paper":
                nn.init.normal_(m.weight, mean=0.0, std=std)
            else:
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


@dataclass(frozen=True)
class FeatureInfo:
    """One feature tap: its ``alias``, the qualified ``module`` name, the number of
    ``channels`` and the spatial ``size`` (H = W) at the config's ``input_size``."""

    alias: str
    module: str
    channels: int
    size: int


def _build_features(cfg: ZFNetConfig) -> tuple[list[LayerSpec], list[FeatureInfo]]:
    widths = cfg.channels
    stages = [
        (1, cfg.conv1_kernel, cfg.conv1_stride, cfg.conv1_padding, True),
        (2, cfg.conv2_kernel, cfg.conv2_stride, cfg.conv2_padding, True),
        (3, 3, 1, 1, False),
        (4, 3, 1, 1, False),
        (5, 3, 1, 1, False),
    ]
    if not cfg.conv34:  # Table 3: "Removed layers 3,4"
        stages = [s for s in stages if s[0] not in (3, 4)]
    layers: list[LayerSpec] = []
    taps: list[FeatureInfo] = []
    in_ch, size = cfg.in_chans, cfg.input_size

    def shrink(new_size: int, what: str) -> int:
        if new_size < 1:
            raise ModelConfigError(
                f"input_size={cfg.input_size} is too small: nothing is left after {what}"
            )
        return new_size

    for idx, kernel, stride, padding, pooled in stages:
        out_ch = widths[idx - 1]
        layers += conv_relu(idx, in_ch, out_ch, kernel, stride, padding, cfg.relu_inplace)
        size = shrink(conv_out_size(size, kernel, stride, padding), f"conv{idx}")
        in_ch = out_ch
        taps.append(FeatureInfo(f"conv{idx}", f"features.relu{idx}", out_ch, size))
        if pooled:
            pool_and_norm = [overlapping_pool(idx)]
            if cfg.lrn:
                # ZFNet normalises after pooling (Fig. 3 caption); Krizhevsky et al. before.
                pos = 0 if cfg.norm_before_pool else 1
                pool_and_norm.insert(pos, contrast_norm(idx, cfg))
            layers += pool_and_norm
            size = shrink(pool_out_size(size), f"pool{idx}")
    layers.append(overlapping_pool(5))
    size = shrink(pool_out_size(size), "pool5")
    taps.append(FeatureInfo("pool5", "features.pool5", in_ch, size))
    return layers, taps


def _build_classifier(cfg: ZFNetConfig, in_features: int) -> list[LayerSpec]:
    layers: list[LayerSpec] = []
    for idx, width in zip((6, 7), cfg.fc_widths, strict=False):
        layers += fc_relu_dropout(idx, in_features, width, cfg.dropout, cfg.relu_inplace)
        in_features = width
    layers.append(("fc8", nn.Linear(in_features, cfg.num_classes)))
    return layers


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class ZFNet(nn.Module):
    """The convnet of Fig. 3 (or a Table 3 variant, per :class:`ZFNetConfig`).

    ``ZFNet()`` is the paper's model for 1000 classes; ``ZFNet(cfg)`` or ``ZFNet(**fields)``
    builds a variant. ``forward`` returns fc8's logits ``[N, num_classes]``."""

    def __init__(self, config: ZFNetConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        cfg = config if config is not None else self.default_config()
        if not isinstance(cfg, ZFNetConfig):
            raise ModelConfigError(f"config must be a ZFNetConfig, got {type(cfg).__name__}")
        if overrides:
            cfg = cfg.replace(**overrides)
        self.config = cfg
        self.num_classes = cfg.num_classes

        feature_layers, taps = _build_features(cfg)
        self.features = nn.Sequential(OrderedDict(feature_layers))
        self.flatten = nn.Flatten()
        top = taps[-1]
        self.classifier = nn.Sequential(
            OrderedDict(_build_classifier(cfg, top.channels * top.size * top.size))
        )
        self.feature_info: list[FeatureInfo] = taps
        self.convlens_aliases: dict[str, str] = self._aliases()
        init_weights(self, cfg.init, cfg.init_std)

    @classmethod
    def default_config(cls) -> ZFNetConfig:
        return ZFNetConfig()

    def _aliases(self) -> dict[str, str]:
        aliases = {t.alias: t.module for t in self.feature_info}
        for idx in (6, 7):
            if hasattr(self.classifier, f"relu{idx}"):
                aliases[f"fc{idx}"] = f"classifier.relu{idx}"
        aliases["fc8"] = aliases["logits"] = "classifier.fc8"
        return aliases

    @property
    def convlens_input_size(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the input the classifier was sized for (3, 224, 224 by default)."""
        return (self.config.in_chans, self.config.input_size, self.config.input_size)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The pool5 maps ``[N, C5, 6, 6]``."""
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(x)))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace fc8 by a fresh ``num_classes``-way layer, initialised per the config.

        Section 5.2: keep layers 1–7 fixed and retrain the softmax for a new dataset."""
        old = self.classifier.fc8
        fc8 = nn.Linear(old.in_features, num_classes).to(old.weight.device, old.weight.dtype)
        init_weights(fc8, self.config.init, self.config.init_std)
        self.classifier.fc8 = fc8
        self.config = self.config.replace(num_classes=num_classes)
        self.num_classes = num_classes

    @torch.no_grad()
    def renormalize_filters_(self, radius: float = 0.1) -> int:
        """Section 3's feature scale clipping: every conv filter whose RMS value exceeds
        ``radius`` (10⁻¹ in the paper) is rescaled to that RMS. Returns how many were."""
        clipped = 0
        for m in self.features.modules():
            if isinstance(m, nn.Conv2d):
                rms = m.weight.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
                clipped += int((rms > radius).sum())
                m.weight.mul_((radius / rms.clamp_min(1e-12)).clamp(max=1.0))
        return clipped


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZFNetConfig:
    """Every option of :class:`ZFNet`, defaulting to Fig. 3; Table 3's variants are
    ``conv_channels=(96, 256, 512, 1024, 512)`` ("layers 3,4,5: 512,1024,512 maps"),
    ``conv34=False`` ("removed layers 3,4"), ``fc_sizes=(4096,)`` ("removed layer 7"),
    ``fc_sizes=()`` ("removed layers 6,7") and ``fc_sizes=(2048, 2048)`` / ``(8192, 8192)``.

    ``width_mult`` scales every conv and fc width (rounded, at least 1) for miniatures.
    ``relu_inplace`` is off by default: Captum's hook-based attributions and convlens's
    deconvnet need each ReLU's input intact."""

    num_classes: int = 1000
    in_chans: int = 3
    input_size: int = 224
    conv_channels: tuple[int, int, int, int, int] = (96, 256, 384, 384, 256)
    conv1_kernel: int = 7
    conv1_stride: int = 2
    conv1_padding: int = 1
    conv2_kernel: int = 5
    conv2_stride: int = 2
    conv2_padding: int = 0
    conv34: bool = True
    fc_sizes: tuple[int, ...] = (4096, 4096)
    dropout: float = 0.5
    lrn: bool = True
    lrn_size: int = 5
    lrn_alpha: float = 1e-4
    lrn_beta: float = 0.75
    lrn_k: float = 2.0
    norm_before_pool: bool = False
    width_mult: float = 1.0
    relu_inplace: bool = False
    init: str = "paper"
    init_std: float = 1e-2

    def __post_init__(self) -> None:
        # Lists arrive from JSON/CLI; the config stays hashable and immutable.
        for name in ("conv_channels", "fc_sizes"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(value))
        self._validate()

    def _validate(self) -> None:
        def positive_int(name: str, value: object) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ModelConfigError(f"{name} must be a positive int, got {value!r}")

        for name in ("num_classes", "in_chans", "input_size", "lrn_size"):
            positive_int(name, getattr(self, name))
        for name in ("conv1_kernel", "conv1_stride", "conv2_kernel", "conv2_stride"):
            positive_int(name, getattr(self, name))
        if not isinstance(self.conv_channels, tuple) or len(self.conv_channels) != 5:
            raise ModelConfigError(
                f"conv_channels must hold 5 widths (conv1..conv5), got {self.conv_channels!r}"
            )
        for i, c in enumerate(self.conv_channels, 1):
            positive_int(f"conv_channels[conv{i}]", c)
        if not isinstance(self.fc_sizes, tuple) or len(self.fc_sizes) > 2:
            raise ModelConfigError(
                f"fc_sizes holds the widths of fc6 and fc7 (at most 2), got {self.fc_sizes!r}"
            )
        for i, c in enumerate(self.fc_sizes, 6):
            positive_int(f"fc_sizes[fc{i}]", c)
        if not 0.0 <= self.dropout < 1.0:
            raise ModelConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not self.width_mult > 0:
            raise ModelConfigError(f"width_mult must be > 0, got {self.width_mult!r}")
        if self.init not in INIT_SCHEMES:
            raise ModelConfigError(f"init must be one of {INIT_SCHEMES}, got {self.init!r}")

    def _scaled(self, width: int) -> int:
        return max(1, int(round(width * self.width_mult)))

    @property
    def channels(self) -> tuple[int, ...]:
        """The conv widths after ``width_mult``."""
        return tuple(self._scaled(c) for c in self.conv_channels)

    @property
    def fc_widths(self) -> tuple[int, ...]:
        """The fc6/fc7 widths after ``width_mult``."""
        return tuple(self._scaled(c) for c in self.fc_sizes)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def replace(self, **changes: Any) -> ZFNetConfig:
        """A copy with ``changes``; an unknown field raises :class:`ModelConfigError` with the
        close matches (never silently ignored)."""
        names = self.field_names()
        unknown = [k for k in changes if k not in names]
        if unknown:
            hint = close_matches(unknown[0], names)
            raise ModelConfigError(f"{type(self).__name__} has no option {unknown[0]!r}{hint}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ZFNetConfig:
        """Build from a plain dict (e.g. the resolved config stored in a checkpoint)."""
        return cls().replace(**values)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists) that :meth:`from_dict` reads back."""
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }


# --------------------------------------------------------------------------------------------
# Registered factories
# --------------------------------------------------------------------------------------------


@register_model(family="zfnet")
def zfnet(**kwargs: Any) -> ZFNet:
    """The model of Fig. 3 (Table 2 "1 convnet as per Fig. 3"); kwargs: :class:`ZFNetConfig`."""
    return ZFNet(ZFNetConfig().replace(**kwargs))


@register_model(family="zfnet")
def zfnet_wide(**kwargs: Any) -> ZFNet:
    """Table 2 (b) / Table 3: Fig. 3 with layers 3, 4, 5 of 512, 1024, 512 maps."""
    return ZFNet(ZFNetConfig(conv_channels=(96, 256, 512, 1024, 512)).replace(**kwargs))


@register_model(family="zfnet")
def zfnet_mini(**kwargs: Any) -> ZFNet:
    """Fig. 3's geometry (224 input, same kernels/strides/sizes) at a quarter of the widths:
    conv 24/64/96/96/64, fc 1024 — a fast stand-in for tests and small experiments."""
    return ZFNet(ZFNetConfig(width_mult=0.25).replace(**kwargs))
