"""A dataset of images as one ordered stream: folder trees and WebDataset-style ``.tar`` shards.

``DATASET`` (what ``convlens atlas --images`` takes; several may be given, in order):

* **a folder**, any depth — an ImageFolder tree (``class/xxx.jpg``) or flat: walked as
  :func:`~convlens.data.find_images` walks it (each folder's files sorted by name, then its
  sub-folders, hidden entries skipped); a ``.tar`` file met on the way is read as a shard, in its
  place; a file that is not a readable image is skipped with a
  :class:`~convlens.data.SkippedImageWarning`;
* **an image file**, read as given (unreadable: an error);
* **a** ``.tar`` **shard** (POSIX/GNU tar, uncompressed, as WebDataset writes them: members
  ``KEY.jpg``, ``KEY.cls``, ``KEY.json`` …), or a brace pattern in WebDataset's notation,
  ``shards/train-{000..099}.tar`` (expanded here, no shell needed). The members whose names end in
  an image suffix (:data:`IMAGE_SUFFIXES`) are the images, in the order they are stored; other
  members (labels, metadata) are ignored. Shards are **read as streams**: nothing is unpacked to
  disk, each image is decoded from its bytes in memory and dropped.

Opening a dataset (:func:`open_dataset`) lists the images once — folder entries, and tar headers
(a seek from header to header; no image data is read) — so every image has a global index (its
place in the stream) and a name (``path`` for a file, ``shard.tar:member`` for a shard member),
the total is known for progress bars, and ``torchrun`` ranks can split the stream by index.
:meth:`ImageDataset.iter_images` decodes only the images asked for, reading shards front to back.

A missing path, a shard that is not a readable tar, or a dataset with no image at all is a
:class:`~convlens.errors.ConvlensError` naming it.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from convlens.data.images import (
    SkippedImageWarning,
    _walk,
    decode_image,
    load_image,
)
from convlens.errors import ConvlensError, ImageError

__all__ = ["IMAGE_SUFFIXES", "ImageItem", "ImageDataset", "open_dataset", "expand_braces"]

#: Member suffixes that make a tar member an image (lower-cased).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".pgm", ".gif", ".tif",
                  ".tiff")  # fmt: skip
_TAR_SUFFIXES = (".tar",)
_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")


@dataclass(frozen=True)
class ImageItem:
    """One image of the stream: its global ``index``, the file it lives in and, for a shard,
    the ``member`` name inside it."""

    index: int
    path: Path
    member: str | None = None
    explicit: bool = False

    @property
    def name(self) -> str:
        return str(self.path) if self.member is None else f"{self.path}:{self.member}"


def expand_braces(pattern: str) -> list[str]:
    """WebDataset's brace notation: ``a-{000..002}.tar`` → ``a-000.tar, a-001.tar, a-002.tar``
    (zero padding kept; several braces multiply)."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
    if int(hi) < int(lo):
        raise ConvlensError(f"{pattern}: empty range {{{lo}..{hi}}}")
    out = []
    for v in range(int(lo), int(hi) + 1):
        head = pattern[: m.start()] + str(v).zfill(width) + pattern[m.end() :]
        out.extend(expand_braces(head))
    return out


def _is_tar(path: Path) -> bool:
    return path.suffix.lower() in _TAR_SUFFIXES


def _tar_members(shard: Path) -> list[str]:
    """Names of the image members of ``shard``, in stored order (headers only). A shard whose
    bytes after the last complete member are not the zero blocks that end a tar (a header cut
    in half, garbage) is refused: tarfile would take it for the end of the archive."""
    names: list[str] = []
    try:
        with tarfile.open(shard, mode="r:") as tf:
            last = None
            for m in tf:
                last = m.name
                base = m.name.rsplit("/", 1)[-1]
                if (
                    m.isfile()
                    and not base.startswith(".")
                    and m.name.lower().endswith(IMAGE_SUFFIXES)
                ):
                    names.append(m.name)
            end = tf.offset
        with open(shard, "rb") as fh:
            fh.seek(end)
            while block := fh.read(1 << 20):
                if block.count(0) != len(block):
                    after = f"after member {last!r}" if last else "at its start"
                    raise ConvlensError(f"{shard}: corrupt or truncated tar shard ({after})")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ConvlensError(f"{shard}: not a readable tar shard ({_why(exc)})") from None
    return names


def _why(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class ImageDataset:
    """The images of a ``DATASET`` in one fixed order (module docstring)."""

    def __init__(self, items: list[ImageItem], sources: list[Path]) -> None:
        self.items = items
        self.sources = sources

    def __len__(self) -> int:
        return len(self.items)

    @property
    def names(self) -> list[str]:
        return [it.name for it in self.items]

    @property
    def shards(self) -> list[Path]:
        return list(dict.fromkeys(it.path for it in self.items if it.member is not None))

    def fingerprint(self) -> str:
        """SHA-256 of every image's name and its file's size: a resumed run checks it reads the
        same dataset."""
        h = hashlib.sha256()
        sizes: dict[Path, int] = {}
        for it in self.items:
            if it.path not in sizes:
                try:
                    sizes[it.path] = it.path.stat().st_size
                except OSError:
                    sizes[it.path] = -1
            h.update(f"{it.name}\0{sizes[it.path]}\n".encode())
        return h.hexdigest()

    def describe(self) -> str:
        n_sh = len(self.shards)
        where = ", ".join(str(p) for p in self.sources[:3]) + (
            " …" if len(self.sources) > 3 else ""
        )
        return f"{len(self)} image(s) in {where}" + (f" ({n_sh} tar shard(s))" if n_sh else "")

    def iter_images(
        self, indices: Iterable[int] | None = None
    ) -> Iterator[tuple[int, Image.Image]]:
        """``(index, RGB image)`` for the images ``indices`` (ascending; all when None), decoded
        one at a time. A shard is read front to back as a stream, once per call; an unreadable
        image inside a folder or shard is skipped with a :class:`SkippedImageWarning`."""
        wanted = range(len(self.items)) if indices is None else indices
        open_tar: tuple[Path, tarfile.TarFile, Iterator[tarfile.TarInfo]] | None = None
        try:
            for i in wanted:
                it = self.items[i]
                if it.member is None:
                    img = self._load_file(it)
                else:
                    if open_tar is None or open_tar[0] != it.path:
                        if open_tar is not None:
                            open_tar[1].close()
                        tf = self._open_stream(it.path)
                        open_tar = (it.path, tf, iter(tf))
                    img = self._load_member(it, open_tar[1], open_tar[2])
                if img is not None:
                    yield i, img
        finally:
            if open_tar is not None:
                open_tar[1].close()

    @staticmethod
    def _open_stream(shard: Path) -> tarfile.TarFile:
        try:
            return tarfile.open(shard, mode="r|")
        except (tarfile.TarError, OSError) as exc:
            raise ConvlensError(f"{shard}: not a readable tar shard ({_why(exc)})") from None

    @staticmethod
    def _load_file(it: ImageItem) -> Image.Image | None:
        if it.explicit:
            return load_image(it.path)
        try:
            return load_image(it.path)
        except ImageError as exc:
            reason = str(exc).removeprefix(f"{it.path}: ")
            warnings.warn(f"{it.path}: skipped: {reason}", SkippedImageWarning, stacklevel=3)
            return None

    @staticmethod
    def _load_member(
        it: ImageItem, tf: tarfile.TarFile, members: Iterator[tarfile.TarInfo]
    ) -> Image.Image | None:
        """Advance the shard's stream to ``it.member`` and decode it (stream order = index
        order, so this never goes back)."""
        try:
            for m in members:
                if m.name != it.member or not m.isfile():
                    continue
                fh = tf.extractfile(m)
                data = fh.read() if fh is not None else b""
                break
            else:
                raise ConvlensError(
                    f"{it.path}: member {it.member!r} not found (the shard changed while read)"
                )
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ConvlensError(
                f"{it.path}: corrupt tar shard at member {it.member!r} ({_why(exc)})"
            ) from None
        try:
            return decode_image(data, it.name)
        except ImageError as exc:
            reason = str(exc).removeprefix(f"{it.name}: ")
            warnings.warn(f"{it.name}: skipped: {reason}", SkippedImageWarning, stacklevel=3)
            return None


def open_dataset(paths: str | Path | Sequence[str | Path]) -> ImageDataset:
    """The :class:`ImageDataset` of folders, image files, ``.tar`` shards and brace patterns
    (module docstring), in the order given."""
    given = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not given:
        raise ConvlensError("dataset: no image paths given")
    expanded: list[Path] = []
    for p in given:
        for q in expand_braces(str(p)):
            expanded.append(Path(q))
    items: list[ImageItem] = []

    def add_file(f: Path, explicit: bool) -> None:
        if _is_tar(f):
            for name in _tar_members(f):
                items.append(ImageItem(len(items), f, name))
        else:
            items.append(ImageItem(len(items), f, None, explicit))

    for p in expanded:
        if not p.exists():
            raise ConvlensError(f"{p}: no such file or folder")
        if p.is_dir():
            for f in _walk(p, True):
                add_file(f, False)
        else:
            add_file(p, True)
    if not items:
        where = ", ".join(str(p) for p in expanded)
        raise ConvlensError(f"{where}: no images found (dataset is empty)")
    return ImageDataset(items, expanded)
