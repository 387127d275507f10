"""Models by name: ``create_model("zfnet")``, ``create_model("efficientnet_lite0")``,
``create_model("resnet18", weights="resnet18.safetensors")``.

Registered here: ``zfnet`` (Fig. 3 of Zeiler & Fergus 2014), ``zfnet_wide`` (Table 3: layers
3,4,5 of 512,1024,512 maps), ``zfnet_mini`` (quarter widths), ``alexnet`` (Krizhevsky et al.
2012 with dense connections, as the paper replicated it) and ``efficientnet_lite0`` (timm's,
with offline ImageNet weights, loaded by default). Any other timm architecture is built by name
with random weights. Every model comes back in eval mode with ``convlens_info``
(:class:`ModelInfo`) and ``convlens_aliases`` (``conv1``…``conv5``, ``pool5``, ``fc6``…``fc8``,
``logits`` for the zfnet/alexnet families). Random weights always warn
(:class:`RandomWeightsWarning`); nothing is ever downloaded.
"""

from convlens.models._common import (
    HALF_MEAN,
    HALF_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelConfigError,
    ModelInfo,
    PreprocessCfg,
    RandomWeightsWarning,
    imagenet_class_names,
)
from convlens.models._registry import (
    MODELS,
    ModelEntry,
    create_model,
    is_model,
    list_models,
    register_model,
)
from convlens.models.alexnet import AlexNet, AlexNetConfig
from convlens.models.checkpoint import load_weights, read_state_dict
from convlens.models.pretrained import OfflineWeights
from convlens.models.zfnet import FeatureInfo, ZFNet, ZFNetConfig

__all__ = [
    "create_model",
    "list_models",
    "is_model",
    "register_model",
    "MODELS",
    "ModelEntry",
    "ModelInfo",
    "PreprocessCfg",
    "OfflineWeights",
    "RandomWeightsWarning",
    "ModelConfigError",
    "load_weights",
    "read_state_dict",
    "imagenet_class_names",
    "ZFNet",
    "ZFNetConfig",
    "AlexNet",
    "AlexNetConfig",
    "FeatureInfo",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "HALF_MEAN",
    "HALF_STD",
]
