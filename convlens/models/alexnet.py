"""AlexNet as Zeiler & Fergus replicated it: Krizhevsky, Sutskever & Hinton, "ImageNet
Classification with Deep Convolutional Neural Networks", NIPS 2012, with *dense* connections
(ECCV 2014 paper, Section 3 and Table 2 "Our replication of (Krizhevsky et al., 2012)").

Provenance: written from the two papers' text; no third-party code was copied. It shares the
blocks, model class and config of :mod:`convlens.models.zfnet` and differs only in defaults:

* **conv1** 96 filters 11×11, stride 4, padding 2 → 55×55; ReLU; contrast (response)
  normalisation *before* pooling, as Krizhevsky et al. order it; max-pool 3×3/2 → 27×27.
* **conv2** 256 filters 5×5, stride 1, padding 2 → 27×27; ReLU; normalisation; pool → 13×13.
* **conv3, conv4, conv5**: 384, 384, 256 filters 3×3, padding 1 → 13×13, dense rather than
  split over two GPUs; pool5 → 6×6; fc6, fc7 4096 with dropout 0.5; fc8 C-way.

The pools use ceil mode like ZFNet's (the sizes above are the same in floor mode). Layer names
and aliases are ZFNet's, except that ``norm{k}`` comes before ``pool{k}``::

    features.{conv1, relu1, norm1, pool1, conv2, relu2, norm2, pool2,
              conv3, relu3, conv4, relu4, conv5, relu5, pool5}
    flatten
    classifier.{fc6, relu6, drop6, fc7, relu7, drop7, fc8}

Initialisation follows the ZF replication (N(0, 0.01²) weights, zero biases; the original's
biases of 1 in some layers are not reproduced).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from convlens.models._registry import register_model
from convlens.models.zfnet import ZFNet, ZFNetConfig

__all__ = ["AlexNet", "AlexNetConfig", "alexnet"]


# No blocks of its own: conv_relu, overlapping_pool, contrast_norm, fc_relu_dropout from zfnet.


class AlexNet(ZFNet):
    """Krizhevsky et al.'s 8-layer convnet with dense connections (see the module docstring);
    options as :class:`AlexNetConfig`."""

    @classmethod
    def default_config(cls) -> AlexNetConfig:
        return AlexNetConfig()


@dataclass(frozen=True)
class AlexNetConfig(ZFNetConfig):
    """:class:`ZFNetConfig` with Krizhevsky et al.'s layer 1 and 2 geometry as defaults;
    every Table 3 variant of it ("removed layers 3,4", fc sizes, ...) is a field change."""

    conv1_kernel: int = 11
    conv1_stride: int = 4
    conv1_padding: int = 2
    conv2_kernel: int = 5
    conv2_stride: int = 1
    conv2_padding: int = 2
    norm_before_pool: bool = True


@register_model(family="alexnet")
def alexnet(**kwargs: Any) -> AlexNet:
    """Table 3 "Our replication of (Krizhevsky et al., 2012)"; kwargs: :class:`AlexNetConfig`."""
    return AlexNet(AlexNetConfig().replace(**kwargs))
