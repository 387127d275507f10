"""Records shared by every model family: :class:`ModelInfo`, :class:`PreprocessCfg`, the
random-weights warning and the ImageNet class names.

Nothing here imports timm at module level (importing timm costs seconds), so that
``import convlens.models`` stays cheap.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from functools import lru_cache

from convlens.data.preprocess import IMAGENET_MEAN, IMAGENET_STD
from convlens.errors import ConvlensError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "HALF_MEAN",
    "HALF_STD",
    "ModelInfo",
    "PreprocessCfg",
    "RandomWeightsWarning",
    "ModelConfigError",
    "imagenet_class_names",
    "warn_random_weights",
]

#: ``x * 2 - 1``: the normalisation of TensorFlow(-Lite) ports such as EfficientNet-Lite.
HALF_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
HALF_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)


class RandomWeightsWarning(UserWarning):
    """A model was created with random weights: whatever it predicts or shows means nothing.

    Issued by :func:`~convlens.models.create_model` on *every* such call (not once per call
    site); silence it explicitly with ``warnings.filterwarnings("ignore", category=...)``."""


class ModelConfigError(ConvlensError, TypeError):
    """An option a model does not have, or a value it cannot take (e.g. ``fc_sizes`` of length 3).

    Also a :class:`TypeError`, as for any unexpected keyword argument in Python."""


@dataclass(frozen=True)
class PreprocessCfg:
    """How an image must be prepared for a model: resize the shorter side to
    ``int(input_size[-1] / crop_pct)`` with ``interpolation``, centre-crop ``input_size``,
    scale to [0, 1], subtract ``mean`` and divide by ``std`` (per RGB channel).

    The default (resize 256, centre crop 224, ImageNet statistics) matches the paper's Section 3
    preprocessing "resizing the smallest dimension to 256, cropping the center ...", with the
    per-channel rather than per-pixel mean."""

    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    crop_pct: float = 0.875

    def __post_init__(self) -> None:
        if self.interpolation not in ("bilinear", "bicubic", "nearest"):
            raise ModelConfigError(
                f"interpolation must be 'bilinear', 'bicubic' or 'nearest', "
                f"got {self.interpolation!r}"
            )
        if not 0.0 < self.crop_pct <= 1.0:
            raise ModelConfigError(f"crop_pct must be in (0, 1], got {self.crop_pct!r}")


@dataclass(frozen=True)
class ModelInfo:
    """What :func:`~convlens.models.create_model` knows about the model it returned
    (attached as ``model.convlens_info``).

    ``weights`` is ``"random"``, ``"pretrained:<source>"`` or the path of the weights file.
    ``class_names`` holds the 1000 ImageNet descriptions (``"tabby, tabby cat"``) when the model
    has 1000 classes and non-random weights, else ``None``."""

    name: str
    family: str
    weights: str
    random_init: bool
    num_classes: int | None
    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    crop_pct: float = 0.875
    class_names: tuple[str, ...] | None = None

    @property
    def resize_size(self) -> int:
        """The shorter-side size to resize to before the centre crop (256 for 224 at 0.875)."""
        return int(self.input_size[-1] / self.crop_pct)

    @property
    def preprocess(self) -> PreprocessCfg:
        return PreprocessCfg(
            self.input_size, self.mean, self.std, self.interpolation, self.crop_pct
        )


@lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class descriptions in index order, from timm's bundled
    ``ImageNetInfo`` (no download): index 967 is ``"espresso"``."""
    from timm.data import ImageNetInfo

    return tuple(ImageNetInfo().label_descriptions())


def _caller_outside_package() -> tuple[str, int, dict]:
    """File, line and globals of the first frame outside ``convlens.models``."""
    frame = sys._getframe(1)
    while frame is not None and str(frame.f_globals.get("__name__", "")).startswith(
        "convlens.models"
    ):
        frame = frame.f_back
    if frame is None:  # pragma: no cover - only when called from the package itself at top level
        return "<convlens.models>", 0, {}
    return frame.f_code.co_filename, frame.f_lineno, frame.f_globals


def warn_random_weights(name: str, reason: str) -> None:
    """Warn loudly that model ``name`` has random weights.

    A fresh registry is passed to :func:`warnings.warn_explicit`, so Python's once-per-location
    de-duplication never hides a repeat (a random model used twice is two mistakes), while
    ``ignore`` and ``error`` filters still apply."""
    filename, lineno, module_globals = _caller_outside_package()
    message = (
        f"model {name!r} has RANDOM weights: {reason}; its predictions and visualisations "
        f"mean nothing. Load trained weights with --weights PATH (weights=PATH from Python: a "
        f".safetensors or torch checkpoint)."
    )
    warnings.warn_explicit(
        message,
        RandomWeightsWarning,
        filename,
        lineno,
        module=str(module_globals.get("__name__", "<unknown>")),
        registry={},
    )
