"""Labelled image sets for the linear probe: an ImageFolder tree (one sub-folder per class) and
the two embedded sets that ship offline (Zeiler & Fergus 2014, Sec. 5.2 uses Caltech-101/256; these
stand in for them when no ``--data`` is given).

* :func:`scan_image_folder` lists ``ROOT/<class>/**/<image>`` in a fixed order (classes sorted by
  name, files sorted within each class) and fingerprints the listing, so that cached features are
  reused only for the same files.
* :func:`embedded_dataset` writes an embedded set as an ImageFolder tree once (``photo-views``:
  random views of the 10 bundled photos; ``digits``: scikit-learn's 8x8 digits, upscaled) and
  returns its folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convlens.data import find_images
from convlens.errors import ConvlensError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFolder",
    "scan_image_folder",
    "EMBEDDED",
    "embedded_dataset",
]

#: File endings counted as images inside class folders (as torchvision's ``ImageFolder``);
#: anything else (READMEs, CSVs) is ignored rather than reported as unreadable.
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".ppm",
    ".pgm",
    ".pbm",
    ".bmp",
    ".tif",
    ".tiff",
    ".webp",
    ".gif",
)


@dataclass(frozen=True)
class ImageFolder:
    """A labelled image set: ``paths[i]`` has class ``classes[labels[i]]``.

    ``name`` is how outputs refer to it (the folder, or ``embedded:<name>``).
    """

    root: Path
    classes: tuple[str, ...]
    paths: tuple[Path, ...]
    labels: np.ndarray
    name: str = ""

    def __len__(self) -> int:
        return len(self.paths)

    def relative_paths(self) -> list[str]:
        """Paths relative to :attr:`root`, POSIX style (what ``linear.json`` lists)."""
        return [p.relative_to(self.root).as_posix() for p in self.paths]

    def counts(self) -> np.ndarray:
        """Images per class, in class order."""
        return np.bincount(self.labels, minlength=len(self.classes))

    def fingerprint(self) -> str:
        """A hash of the class names and of every file's relative path, size and mtime: the
        dataset part of the feature-cache key (a changed, added or removed file changes it)."""
        h = hashlib.blake2b(digest_size=16)
        h.update("\0".join(self.classes).encode())
        for rel, p, label in zip(self.relative_paths(), self.paths, self.labels, strict=True):
            st = p.stat()
            h.update(f"\0{rel}\0{int(label)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
        return h.hexdigest()


def scan_image_folder(root: str | os.PathLike, name: str | None = None) -> ImageFolder:
    """Read an ImageFolder tree: every non-hidden sub-folder of ``root`` is a class (sorted by
    name); its image files (:data:`IMAGE_EXTENSIONS`, searched recursively, sorted) are that
    class's images. Files directly in ``root`` are ignored.

    Raises:
        ConvlensError: ``root`` is not a folder, has fewer than two class folders, or a class
            folder holds no image file.
    """
    root = Path(root)
    if not root.is_dir():
        raise ConvlensError(f"{root}: not a folder (--data expects ROOT/<class>/<image> folders)")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if len(classes) < 2:
        raise ConvlensError(
            f"{root}: found {len(classes)} class folder(s); a linear probe needs at least two "
            "(layout ROOT/<class>/<image>)"
        )
    paths: list[Path] = []
    labels: list[int] = []
    for c, cls in enumerate(classes):
        files = [f for f in find_images(root / cls) if f.suffix.lower() in IMAGE_EXTENSIONS]
        if not files:
            raise ConvlensError(f"{root / cls}: class folder has no image files")
        paths.extend(files)
        labels.extend([c] * len(files))
    return ImageFolder(
        root=root,
        classes=tuple(classes),
        paths=tuple(paths),
        labels=np.asarray(labels, dtype=np.int64),
        name=name or str(root),
    )


# -- embedded sets -----------------------------------------------------------------------------

#: Bumped whenever an embedded set's images change, so a stale copy is never reused.
_EMBEDDED_VERSION = 1
#: Largest side of the photo views written (the model's preprocessing resizes to its input).
_SIDE = 256


def _photo_views(out: Path, per_class: int, seed: int) -> None:
    """10 classes, one per bundled photo (``convlens.data.list_samples``); each image is a random
    square view of that photo: 5-30 % of its area, random position, mirrored half the time, a
    quarter turned grey, brightness and saturation jittered; stored at the view's own
    resolution (at most 256 px). Telling which photo a small view comes from needs more than its
    colours: shallow features do worse than deep ones."""
    from PIL import Image, ImageEnhance, ImageOps

    from convlens.data import list_samples, load_image

    rng = np.random.default_rng(seed)
    for s in list_samples():
        photo = load_image(s.path)
        w, h = photo.size
        folder = out / s.name
        folder.mkdir(parents=True)
        for j in range(per_class):
            side = int(np.sqrt(rng.uniform(0.05, 0.30) * w * h))
            side = max(16, min(side, w, h))
            x0 = int(rng.integers(0, w - side + 1))
            y0 = int(rng.integers(0, h - side + 1))
            view = photo.crop((x0, y0, x0 + side, y0 + side))
            if rng.random() < 0.5:
                view = ImageOps.mirror(view)
            if rng.random() < 0.25:
                view = ImageOps.grayscale(view).convert("RGB")
            view = ImageEnhance.Brightness(view).enhance(rng.uniform(0.7, 1.3))
            view = ImageEnhance.Color(view).enhance(rng.uniform(0.6, 1.4))
            if side > _SIDE:  # the model's preprocessing resizes anyway: store no more
                view = view.resize((_SIDE, _SIDE), Image.Resampling.BICUBIC)
            view.save(folder / f"{j:03d}.png", compress_level=1)


def _digits(out: Path, per_class: int, seed: int) -> None:
    """scikit-learn's ``load_digits`` (1797 8x8 handwritten digits, 10 classes): the first
    ``per_class`` of each class in the file's order, ink scaled to white on black, upscaled
    (bicubic) to 64x64 RGB (the model's preprocessing brings them to its input size). Far from
    ImageNet: here low layers beat high ones."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for c in range(10):
        folder = out / str(c)
        folder.mkdir(parents=True)
        idx = np.flatnonzero(digits.target == c)[:per_class]
        for j, i in enumerate(idx):
            a = np.clip(digits.images[i] / 16.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)
            img = Image.fromarray(a).resize((64, 64), Image.Resampling.BICUBIC)
            img.convert("RGB").save(folder / f"{j:03d}.png", compress_level=1)


#: name -> (writer, images per class)
EMBEDDED: dict[str, tuple] = {
    "photo-views": (_photo_views, 16),
    "digits": (_digits, 16),
}


def embedded_dataset(name: str, cache_root: str | os.PathLike, seed: int = 0) -> Path:
    """The folder of the embedded set ``name`` under ``cache_root/datasets/``, written on first
    use (to a temporary folder, then renamed, so a crash never leaves half a set). The set does
    not depend on the run's ``--seed``: it is generated with ``seed`` (0 by default).

    Raises:
        ConvlensError: an unknown name.
    """
    if name not in EMBEDDED:
        raise ConvlensError(f"embedded set {name!r}: unknown (choose from {', '.join(EMBEDDED)})")
    writer, per_class = EMBEDDED[name]
    parent = Path(cache_root) / "datasets"
    folder = parent / f"{name}-v{_EMBEDDED_VERSION}-n{per_class}-s{seed}"
    if folder.is_dir():
        return folder
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=parent))
    try:
        writer(tmp, per_class, seed)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not folder.is_dir():  # not a concurrent writer that finished first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
