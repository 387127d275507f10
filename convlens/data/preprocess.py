"""Turning RGB images into model input, and back.

:class:`Preprocess` is the standard ImageNet evaluation transform (Zeiler & Fergus 2014, Sec. 3:
resize the smaller side to 256, crop the central 224x224, subtract the mean, here also divide by the
per-channel std as torchvision and timm models expect). It is written with PIL and torch only and
gives the same tensors as ``torchvision.transforms`` ``Resize(s) -> CenterCrop(c) -> ToTensor() ->
Normalize(mean, std)`` and as timm's eval transform for square inputs.

:meth:`Preprocess.for_model` reads the settings a model carries (a ``convlens_info`` record, or
timm's ``pretrained_cfg``), so the same image reaches every model the way it was trained to see it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from convlens.data.images import PathLike, _to_rgb8, iter_images
from convlens.errors import ConvlensError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DEFAULT_CROP_PCT",
    "INTERPOLATIONS",
    "MAX_UPSCALE",
    "UpscaleWarning",
    "Preprocess",
    "load_batch",
]

#: An image whose shorter side is enlarged more than this many times gets an
#: :class:`UpscaleWarning` (the model then sees a few pixels blown up, not a photo).
MAX_UPSCALE = 8.0


class UpscaleWarning(UserWarning):
    """An image was enlarged more than :data:`MAX_UPSCALE` times to reach the model's input."""


IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: timm's default ``crop_pct`` (224 / 256) when a config leaves it unset.
DEFAULT_CROP_PCT: float = 0.875

#: Interpolation names (timm's spelling) and the PIL filters they select.
INTERPOLATIONS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "hamming": Image.Resampling.HAMMING,
    "box": Image.Resampling.BOX,
}


def _floats3(value: Any, what: str) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ConvlensError(f"Preprocess {what}: expected 3 numbers, got {value!r}") from None
    if len(out) != 3 or not all(math.isfinite(v) for v in out):
        raise ConvlensError(f"Preprocess {what}: expected 3 finite numbers, got {value!r}")
    return out  # type: ignore[return-value]


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side, centre-crop, scale to [0, 1], normalise: PIL RGB -> ``[3, H, W]``.

    Attributes:
        input_size: ``(height, width)`` of the crop the model sees.
        resize: the length the shorter image side is resized to before cropping (aspect ratio
            kept; the longer side is ``int(resize * long / short)``, as in torchvision). Must be at
            least ``max(input_size)`` so the crop never needs padding.
        mean, std: per-channel normalisation in [0, 1] RGB units.
        interpolation: resampling filter, one of :data:`INTERPOLATIONS`.
    """

    input_size: tuple[int, int] = (224, 224)
    resize: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        size = tuple(self.input_size)
        if len(size) != 2 or not all(isinstance(v, (int, np.integer)) and v > 0 for v in size):
            raise ConvlensError(
                "Preprocess input_size: expected (height, width) positive ints, "
                f"got {self.input_size!r}"
            )
        object.__setattr__(self, "input_size", (int(size[0]), int(size[1])))
        if not isinstance(self.resize, (int, np.integer)) or isinstance(self.resize, bool):
            raise ConvlensError(f"Preprocess resize: expected an int, got {self.resize!r}")
        object.__setattr__(self, "resize", int(self.resize))
        if self.resize < max(self.input_size):
            raise ConvlensError(
                f"Preprocess resize={self.resize}: smaller than the {size[0]}x{size[1]} crop "
                "(the crop would need padding)"
            )
        object.__setattr__(self, "mean", _floats3(self.mean, "mean"))
        std = _floats3(self.std, "std")
        if min(std) <= 0:
            raise ConvlensError(f"Preprocess std: must be positive, got {std}")
        object.__setattr__(self, "std", std)
        if self.interpolation not in INTERPOLATIONS:
            raise ConvlensError(
                f"Preprocess interpolation {self.interpolation!r}: unknown "
                f"(choose from {', '.join(INTERPOLATIONS)})"
            )

    # -- the transform -----------------------------------------------------------------------

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """``(width, height)`` after resizing the shorter side of a ``width x height`` image."""
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.resize * long / short)
        return (self.resize, new_long) if width <= height else (new_long, self.resize)

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """The ``(left, top, right, bottom)`` crop of a ``width x height`` image, in pixels of the
        resized image (torchvision's rule: ``top = int(round((H - h) / 2))``)."""
        rw, rh = self.resized_size(width, height)
        ch, cw = self.input_size
        top = int(round((rh - ch) / 2.0))
        left = int(round((rw - cw) / 2.0))
        return left, top, left + cw, top + ch

    def resize_crop(self, img: Image.Image) -> Image.Image:
        """The geometric part alone: the RGB ``input_size`` crop the model sees, as a PIL image
        (useful to draw results over what the model actually saw)."""
        img = self._rgb(img)
        size = self.resized_size(*img.size)
        factor = self.resize / max(min(img.size), 1)
        if factor > MAX_UPSCALE:
            name = getattr(img, "filename", "") or "an image"
            warnings.warn(
                f"{name}: {img.size[0]}x{img.size[1]} px enlarged {factor:.0f}x to the model's "
                f"{self.input_size[0]}x{self.input_size[1]} input (more than {MAX_UPSCALE:g}x: "
                "it sees a few pixels blown up)",
                UpscaleWarning,
                stacklevel=3,
            )
        resized = img.resize(size, INTERPOLATIONS[self.interpolation])
        return resized.crop(self.crop_box(*img.size))

    def to_tensor01(self, img: Image.Image) -> torch.Tensor:
        """``[3, H, W]`` float32 in [0, 1] of the resized crop, before normalisation."""
        crop = self.resize_crop(img)
        array = np.asarray(crop, dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous().float().div(255)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """A PIL image (any mode; converted like :func:`~convlens.data.load_image`) -> normalised
        float32 ``[3, H, W]``."""
        return self.normalize(self.to_tensor01(img))

    def batch(self, images: Iterable[Image.Image]) -> torch.Tensor:
        """Several images -> ``[N, 3, H, W]``.

        Raises:
            ConvlensError: no images.
        """
        tensors = [self(img) for img in images]
        if not tensors:
            raise ConvlensError("Preprocess.batch: no images given")
        return torch.stack(tensors)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] RGB ``[3, H, W]`` or ``[N, 3, H, W]`` -> model input space."""
        mean, std = self._stats(x)
        return x.sub(mean).div(std)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Model input ``[3, H, W]`` or ``[N, 3, H, W]`` -> [0, 1] RGB (clamped), for rendering."""
        mean, std = self._stats(x)
        return x.mul(std).add(mean).clamp(0.0, 1.0)

    def to_model_space(self, rgb01: float | Sequence[float]) -> tuple[float, float, float]:
        """The model-input value of one pixel colour given in [0, 1] RGB.

        ``to_model_space(0.5)`` is mid-grey, ``to_model_space(p.mean)`` is ``(0, 0, 0)``; occlusion
        probes report their fill colour this way (Zeiler & Fergus 2014, Sec. 4.2, grey squares).

        Raises:
            ConvlensError: not one number or three, or outside [0, 1].
        """
        if isinstance(rgb01, (int, float, np.floating, np.integer)) and not isinstance(rgb01, bool):
            values = (float(rgb01),) * 3
        else:
            values = _floats3(rgb01, "to_model_space colour")
        if not all(0.0 <= v <= 1.0 for v in values):
            raise ConvlensError(f"Preprocess to_model_space colour {rgb01!r}: must lie in [0, 1]")
        r, g, b = ((v - m) / s for v, m, s in zip(values, self.mean, self.std, strict=True))
        return r, g, b

    # -- (de)serialisation and construction ---------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings; :meth:`from_dict` reads them back."""
        data = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocess:
        """The inverse of :meth:`to_dict`.

        Raises:
            ConvlensError: an unknown key (never silently ignored) or a bad value.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConvlensError(
                f"Preprocess settings: unknown key(s) {', '.join(unknown)} "
                f"(known: {', '.join(sorted(known))})"
            )
        kwargs = dict(data)
        for key in ("input_size", "mean", "std"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)

    @classmethod
    def for_model(cls, model: object) -> Preprocess:
        """The preprocessing a model expects.

        In order: the model's ``convlens_info`` record (fields ``input_size`` ``(C, H, W)``,
        ``mean``, ``std``, ``interpolation``, ``crop_pct``); else timm's ``pretrained_cfg`` through
        ``timm.data.resolve_data_config``; else the ImageNet default (256 -> 224, ImageNet
        mean/std, bilinear). The resize follows timm: ``floor(H / crop_pct)`` (crop_pct 0.875 when
        unset), so a square-input model gets exactly timm's eval transform. For a non-square input
        the shorter side is resized to ``floor(max(H, W) / crop_pct)``, which covers the crop but
        differs from timm's keep-ratio resize. timm's ``squash``/``border`` crop modes are not
        supported: a warning says the centre crop is used instead.

        Raises:
            ConvlensError: a ``convlens_info`` record missing a field or with unusable values.
        """
        info = getattr(model, "convlens_info", None)
        owner = type(model).__name__
        if info is not None:
            missing = [
                f
                for f in ("input_size", "mean", "std", "interpolation", "crop_pct")
                if not hasattr(info, f)
            ]
            if missing:
                raise ConvlensError(f"{owner}.convlens_info: missing field(s) {', '.join(missing)}")
            return cls._from_config(
                owner,
                input_size=info.input_size,
                mean=info.mean,
                std=info.std,
                interpolation=info.interpolation,
                crop_pct=info.crop_pct,
                crop_mode=getattr(info, "crop_mode", None),
            )
        if getattr(model, "pretrained_cfg", None):
            from timm.data import resolve_data_config

            cfg = resolve_data_config({}, model=model)
            return cls._from_config(
                owner,
                input_size=cfg["input_size"],
                mean=cfg["mean"],
                std=cfg["std"],
                interpolation=cfg["interpolation"],
                crop_pct=cfg.get("crop_pct"),
                crop_mode=cfg.get("crop_mode"),
            )
        return cls()

    @classmethod
    def _from_config(
        cls,
        owner: str,
        *,
        input_size: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        interpolation: str,
        crop_pct: float | None,
        crop_mode: str | None,
    ) -> Preprocess:
        size = tuple(input_size)
        if len(size) != 3 or size[0] != 3:
            raise ConvlensError(
                f"{owner}: input_size {input_size!r} is not (3, H, W); "
                "only RGB models are supported"
            )
        _, height, width = (int(v) for v in size)
        pct = DEFAULT_CROP_PCT if crop_pct is None else float(crop_pct)
        if not 0.0 < pct <= 1.0:
            raise ConvlensError(f"{owner}: crop_pct {crop_pct!r} is not in (0, 1]")
        if crop_mode not in (None, "center"):
            warnings.warn(
                f"{owner}: crop_mode {crop_mode!r} is not supported; using a centre crop",
                stacklevel=3,
            )
        resize = math.floor(max(height, width) / pct)
        try:
            return cls(
                input_size=(height, width),
                resize=resize,
                mean=tuple(mean),
                std=tuple(std),
                interpolation=str(interpolation),
            )
        except ConvlensError as exc:
            raise ConvlensError(f"{owner}: {exc}") from None

    # -- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _rgb(img: Image.Image) -> Image.Image:
        if not isinstance(img, Image.Image):
            raise ConvlensError(f"Preprocess: expected a PIL image, got {type(img).__name__}")
        if img.mode == "RGB":
            return img
        img.load()
        return _to_rgb8(img)

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() not in (3, 4) or x.shape[-3] != 3:
            raise ConvlensError(
                f"Preprocess: expected a [3, H, W] or [N, 3, H, W] tensor, got {list(x.shape)}"
            )
        dtype = x.dtype if x.is_floating_point() else torch.float32
        mean = torch.as_tensor(self.mean, dtype=dtype, device=x.device).view(3, 1, 1)
        std = torch.as_tensor(self.std, dtype=dtype, device=x.device).view(3, 1, 1)
        return mean, std


def load_batch(
    paths: PathLike | Iterable[PathLike],
    preprocess: Preprocess | None = None,
    max_pixels: int | None = None,
    recursive: bool = True,
) -> tuple[torch.Tensor, list[Path]]:
    """Read images (files and/or folders, as :func:`~convlens.data.iter_images`) into one
    normalised ``[N, 3, H, W]`` batch, with the path of each row.

    Raises:
        ImageError: as :func:`~convlens.data.iter_images` (missing path, bad explicit file,
            nothing readable).
    """
    prep = preprocess if preprocess is not None else Preprocess()
    tensors: list[torch.Tensor] = []
    found: list[Path] = []
    # stream: each image is decoded, transformed and dropped before the next is read
    for path, img in iter_images(paths, max_pixels=max_pixels, recursive=recursive):
        tensors.append(prep(img))
        found.append(path)
    return torch.stack(tensors), found
