"""Images in, model input out: loading, preprocessing, and the bundled sample photos.

* :func:`load_image` reads any common image file as upright 8-bit RGB, or raises
  :class:`~convlens.errors.ImageError` naming the file; :func:`iter_images` / :func:`load_images`
  do the same over files and folders, skipping unreadable files inside folders with a
  :class:`SkippedImageWarning`.
* :class:`Preprocess` is the resize -> centre crop -> normalise transform (and its inverse for
  rendering); :meth:`Preprocess.for_model` reads a model's own settings.
* :func:`list_samples`, :func:`sample`, :func:`default_images` and :func:`lfw_faces` give real
  photos that ship with scikit-image and scikit-learn, so nothing needs downloading.
* :func:`open_dataset` reads a ``DATASET`` — folder trees and WebDataset-style ``.tar`` shards,
  streamed — as one ordered, indexed :class:`ImageDataset` (``convlens atlas``).
* :func:`mining_set` is the embedded mining set: a few hundred seeded natural-image crops cut from
  every photo those packages (and matplotlib) ship, built once into a cache folder.
"""

from __future__ import annotations

from convlens.data.dataset import IMAGE_SUFFIXES, ImageDataset, ImageItem, open_dataset
from convlens.data.images import (
    ALPHA_BACKGROUND,
    MAX_PIXELS,
    SkippedImageWarning,
    decode_image,
    find_images,
    iter_images,
    load_image,
    load_images,
)
from convlens.data.mining import MiningSource, mining_set, mining_sources
from convlens.data.preprocess import (
    DEFAULT_CROP_PCT,
    IMAGENET_MEAN,
    IMAGENET_STD,
    INTERPOLATIONS,
    MAX_UPSCALE,
    Preprocess,
    UpscaleWarning,
    load_batch,
)
from convlens.data.samples import (
    DEFAULT_SAMPLES,
    Sample,
    default_images,
    lfw_faces,
    list_samples,
    sample,
)

__all__ = [
    # images
    "MAX_PIXELS",
    "ALPHA_BACKGROUND",
    "SkippedImageWarning",
    "load_image",
    "decode_image",
    "find_images",
    "iter_images",
    "load_images",
    # datasets (folders, tar shards)
    "IMAGE_SUFFIXES",
    "ImageItem",
    "ImageDataset",
    "open_dataset",
    # preprocess
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DEFAULT_CROP_PCT",
    "INTERPOLATIONS",
    "Preprocess",
    "UpscaleWarning",
    "MAX_UPSCALE",
    "load_batch",
    # samples
    "Sample",
    "DEFAULT_SAMPLES",
    "list_samples",
    "sample",
    "default_images",
    "lfw_faces",
    # mining
    "MiningSource",
    "mining_set",
    "mining_sources",
]
