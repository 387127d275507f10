"""Reading images from disk: one file, or every image in folders.

:func:`load_image` always returns a fully decoded 8-bit RGB :class:`PIL.Image.Image`, whatever the
file held (grayscale, 16-bit, palette, CMYK, alpha, an EXIF-rotated phone photo), or raises an
:class:`~convlens.errors.ImageError` whose one-line message starts with the path. Images larger than
:data:`MAX_PIXELS` are refused from the header alone, before any pixel is decoded.

:func:`iter_images` / :func:`load_images` read a mix of files and folders: a bad file inside a
folder (a ``README.txt``, a truncated JPEG) is skipped with a :class:`SkippedImageWarning` that
names it, while a bad file named explicitly is an error.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from convlens.errors import ImageError

__all__ = [
    "MAX_PIXELS",
    "ALPHA_BACKGROUND",
    "SkippedImageWarning",
    "PathLike",
    "load_image",
    "decode_image",
    "find_images",
    "iter_images",
    "load_images",
]

#: Largest image (width x height) that :func:`load_image` decodes by default; the same default as
#: PIL's ``Image.MAX_IMAGE_PIXELS`` (about 0.25 GB of 24-bit pixels, 1024 * 1024 * 1024 // 4 // 3).
MAX_PIXELS: int = 89_478_485

#: Transparent pixels are composited over this neutral mid-grey, which is close to the ImageNet
#: mean colour, so that transparency reads as "nothing here" to a convnet rather than as black.
ALPHA_BACKGROUND: tuple[int, int, int] = (128, 128, 128)

PathLike = str | os.PathLike[str]

_GRAY_MODES_8BIT = {"L", "1"}


class SkippedImageWarning(UserWarning):
    """A file inside a folder was not a readable image and was skipped; the message names it."""


class _Unreadable(Exception):
    """Internal: why a file could not be read (the caller adds the path)."""


# raised unchanged through the broad "corrupt data" handlers
_PASS_THROUGH = (
    _Unreadable,
    MemoryError,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)


def load_image(path: PathLike, max_pixels: int | None = None) -> Image.Image:
    """Read one image file as a fully decoded 8-bit RGB image.

    * EXIF orientation is applied (a portrait phone photo comes back upright, width and height
      swapped as needed).
    * Grayscale (``L``, ``1``), palette and CMYK images are converted to RGB. 16-bit and 32-bit
      integer grayscale (``I;16``, ``I``) are scaled from 0..65535 to 0..255 (``round(v / 257)``:
      65535 -> 255, 32768 -> 128); 16-bit RGB(A) PNGs are reduced to their high byte by PIL, which
      agrees on those values. Float images (``F``) are read as 0..1 when all values lie in [0, 1],
      else as 0..255 (PIL's convention), and clipped.
    * Alpha (``RGBA``, ``LA``, ``PA``, palette or colour-key transparency) is composited over the
      mid-grey :data:`ALPHA_BACKGROUND` ``(128, 128, 128)``.
    * Multi-frame files (GIF, TIFF) give their first frame.

    Images with more than ``max_pixels`` pixels (default :data:`MAX_PIXELS`) are refused after
    reading only the header. PIL's own hard limit (twice ``PIL.Image.MAX_IMAGE_PIXELS``) still
    applies on top; raise that global to read larger images. If the process has set
    ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES``, PIL pads truncated files instead of failing and they
    cannot be told apart from complete ones.

    Raises:
        ImageError: ``"<path>: <reason>"`` for a missing file, a directory, a file that is not an
            image, truncated or corrupt data, or an image that is too large.
    """
    p = Path(path)
    try:
        return _load(p, MAX_PIXELS if max_pixels is None else max_pixels)
    except _Unreadable as exc:
        raise ImageError(f"{p}: {exc}") from exc.__cause__


def decode_image(data: bytes, name: str, max_pixels: int | None = None) -> Image.Image:
    """:func:`load_image` for an image held in memory (a member of a ``.tar`` shard read as a
    stream): the same decoding and the same checks; errors name ``name``."""
    try:
        return _load(Path(name), MAX_PIXELS if max_pixels is None else max_pixels, data)
    except _Unreadable as exc:
        raise ImageError(f"{name}: {exc}") from exc.__cause__


def _load(path: Path, max_pixels: int, data: bytes | None = None) -> Image.Image:
    if data is None and not path.exists():
        raise _Unreadable("no such file")
    if data is None and path.is_dir():
        raise _Unreadable("is a directory, not an image file")
    pil_limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        # PIL warns above its own limit; ours (max_pixels) is the one that decides, so the warning
        # is an error only when our limit is not larger than PIL's.
        action = "ignore" if pil_limit is not None and max_pixels > pil_limit else "error"
        warnings.simplefilter(action, Image.DecompressionBombWarning)
        try:
            with Image.open(path if data is None else io.BytesIO(data)) as opened:
                width, height = opened.size  # from the header: no pixel decoded yet
                if width * height > max_pixels:
                    raise _Unreadable(_too_large(width, height, max_pixels))
                try:
                    opened.load()  # force the full decode here, so corrupt data fails now
                except _PASS_THROUGH:
                    raise
                except Exception as exc:  # OSError, SyntaxError, ValueError, zlib.error, ...
                    raise _Unreadable(f"corrupt or truncated image data ({_why(exc)})") from exc
                try:
                    return _to_rgb8(_upright(opened, path))
                except _PASS_THROUGH:
                    raise
                except Exception as exc:
                    raise _Unreadable(
                        f"cannot convert {opened.mode} image to RGB ({_why(exc)})"
                    ) from exc
        except _Unreadable:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _Unreadable(
                f"too large, refused as a possible decompression bomb ({exc})"
            ) from exc
        except UnidentifiedImageError as exc:
            raise _Unreadable("not an image (unrecognised file format)") from exc
        except PermissionError as exc:
            raise _Unreadable(f"cannot read ({exc.strerror or exc})") from exc
        except MemoryError:
            raise
        except Exception as exc:  # a malformed header can raise almost anything inside PIL
            raise _Unreadable(f"corrupt or truncated image header ({_why(exc)})") from exc


def _too_large(width: int, height: int, limit: int) -> str:
    return (
        f"{width}x{height} = {width * height:,} pixels exceeds the limit of {limit:,} "
        "(refused as a possible decompression bomb; pass a larger max_pixels to read it)"
    )


def _why(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _upright(img: Image.Image, path: Path) -> Image.Image:
    """Apply the EXIF orientation; a malformed EXIF block leaves the image as stored."""
    try:
        out = ImageOps.exif_transpose(img)
    except Exception as exc:  # broken EXIF must not make a decodable image unreadable
        warnings.warn(f"{path}: EXIF orientation ignored ({_why(exc)})", stacklevel=2)
        return img.copy()
    return out if out is not None else img.copy()


def _to_rgb8(img: Image.Image) -> Image.Image:
    """Any decoded PIL image -> a new 8-bit RGB image (see :func:`load_image` for the rules)."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in _GRAY_MODES_8BIT:
        if "transparency" in img.info:
            return _over_background(img.convert("LA").convert("RGBA"))
        return img.convert("L").convert("RGB")
    if mode.startswith("I") or mode == "F":
        gray = _scale_to_uint8(np.asarray(img), mode)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        return _over_background(img.convert("RGBA"))
    return img.convert("RGB")


def _scale_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    if mode == "F":
        data = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if data.size and data.min() >= 0.0 and data.max() <= 1.0:
            data = data * 255.0
        return np.clip(np.rint(data), 0, 255).astype(np.uint8)
    # I;16 / I;16B / I;16L / I: 16-bit unsigned range
    data = np.clip(values.astype(np.int64), 0, 65535)
    return np.rint(data / 257.0).astype(np.uint8)


def _over_background(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


# -- folders -----------------------------------------------------------------------------------


def _as_path_list(paths: PathLike | Iterable[PathLike]) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        return [Path(paths)]
    return [Path(p) for p in paths]


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _walk(
    folder: Path, recursive: bool, seen: set[tuple[int, int]] | None = None
) -> Iterator[Path]:
    """Regular, non-hidden files under ``folder``, in a fixed order: each folder's files sorted
    by name, then its sub-folders (sorted) depth-first. Symlinked folders are followed; each real
    folder is walked once (``seen``: device and inode), so a link back to an ancestor — a loop —
    or a second link to the same folder adds nothing."""
    seen = set() if seen is None else seen
    try:
        st = os.stat(folder)
    except OSError as exc:
        raise ImageError(f"{folder}: cannot list folder ({_why(exc)})") from exc
    key = (st.st_dev, st.st_ino)
    if key in seen:
        return
    seen.add(key)
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        raise ImageError(f"{folder}: cannot list folder ({_why(exc)})") from exc
    subdirs = []
    for entry in entries:
        if _is_hidden(entry.name):
            continue
        try:
            if entry.is_dir():  # follows a symlink to a folder
                subdirs.append(entry)
            elif entry.is_file():
                yield Path(entry.path)
        except OSError:  # an entry vanished or is unreadable: not a candidate
            continue
    if recursive:
        for entry in subdirs:
            try:
                yield from _walk(Path(entry.path), recursive, seen)
            except ImageError:
                if not entry.is_symlink():
                    raise
                continue  # a dangling or unreadable link inside a folder: not a candidate


def _check_exist(paths: list[Path]) -> None:
    if not paths:
        raise ImageError("no image paths given")
    for p in paths:
        if not p.exists():
            raise ImageError(f"{p}: no such file or directory")


def _candidates(paths: list[Path], recursive: bool) -> Iterator[tuple[Path, bool]]:
    """``(file, explicit)`` pairs: explicit files as given, folders walked."""
    for p in paths:
        if p.is_dir():
            for f in _walk(p, recursive):
                yield f, False
        else:
            yield p, True


def find_images(paths: PathLike | Iterable[PathLike], recursive: bool = True) -> list[Path]:
    """The candidate image files named by ``paths`` (files and/or folders), in a fixed order.

    Files are returned as given; folders contribute every regular file inside them (recursively
    unless ``recursive=False``), sorted by name, hidden files and folders (``.name``) skipped.
    Nothing is opened: non-images are weeded out later by :func:`iter_images`.

    Raises:
        ImageError: a path that does not exist, or no paths at all.
    """
    plist = _as_path_list(paths)
    _check_exist(plist)
    return [f for f, _ in _candidates(plist, recursive)]


def iter_images(
    paths: PathLike | Iterable[PathLike],
    max_pixels: int | None = None,
    recursive: bool = True,
) -> Iterator[tuple[Path, Image.Image]]:
    """Lazily yield ``(path, rgb_image)`` for every readable image in ``paths``.

    Folders are walked as in :func:`find_images` while iterating, so a large folder streams one
    image at a time. A file found inside a folder that cannot be read is skipped with a
    :class:`SkippedImageWarning` (``"<file>: skipped: <reason>"``); a file named explicitly that
    cannot be read raises. Missing paths are reported at once, before the first image.

    Raises:
        ImageError: a missing path, an unreadable explicit file, or no readable image at all
            (raised when the iteration ends empty).
    """
    plist = _as_path_list(paths)
    _check_exist(plist)
    return _iterate(plist, max_pixels, recursive)


def _iterate(
    plist: list[Path], max_pixels: int | None, recursive: bool
) -> Iterator[tuple[Path, Image.Image]]:
    found = skipped = 0
    for f, explicit in _candidates(plist, recursive):
        if explicit:
            img = load_image(f, max_pixels)
        else:
            try:
                img = load_image(f, max_pixels)
            except ImageError as exc:
                skipped += 1
                reason = str(exc).removeprefix(f"{f}: ")
                warnings.warn(f"{f}: skipped: {reason}", SkippedImageWarning, stacklevel=2)
                continue
        found += 1
        yield f, img
    if not found:
        where = ", ".join(str(p) for p in plist)
        note = f" ({skipped} unreadable file(s) skipped)" if skipped else ""
        raise ImageError(f"{where}: no images found{note}")


def load_images(
    paths: PathLike | Iterable[PathLike],
    max_pixels: int | None = None,
    recursive: bool = True,
) -> list[tuple[Path, Image.Image]]:
    """All readable images in ``paths`` as ``(path, rgb_image)`` pairs; see :func:`iter_images`."""
    return list(iter_images(paths, max_pixels=max_pixels, recursive=recursive))
