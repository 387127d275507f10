"""The embedded mining set: a few hundred natural-image crops made offline from bundled photos.

``convlens probe deconv`` mines the top-9 activations of a feature map over a set of images
(Zeiler & Fergus 2014, Section 2.1 and Fig. 2). With no ``--images`` it mines this set, so that a
first run shows real image patches without any download. :func:`mining_set` returns its files.

Sources
    Every natural photo that the installed packages keep on disk (never a download or a pooch
    fetcher): ``skimage/data/*.png|*.jpg`` (scikit-image), ``sklearn/datasets/images/*.jpg``
    (scikit-learn) and ``sample_data/*.png|*.jpg`` under ``matplotlib.get_data_path()``
    (matplotlib). Colour and greyscale photos are both used; :func:`~convlens.data.load_image`
    reads them as 8-bit RGB (grey replicated into the three channels). A package or file that is
    missing is skipped; fewer than :data:`MIN_SOURCES` photos is a
    :class:`~convlens.errors.ConvlensError`.

The include/exclude rule
    A file matching the patterns above is used unless (1) it is named in :data:`EXCLUDED`, the
    explicit list of synthetic and non-photo images with the reason for each (chessboards, logos,
    the colour wheel, the Shepp-Logan phantom, text pages, the horse silhouette, an icon, a
    hologram reconstruction), or (2) it fails to load, (3) it has several frames (stacks,
    animations), (4) it has an alpha channel (cut-outs and clip art, not photos), or (5) its short
    side is below :data:`MIN_SOURCE_SIDE` pixels. :func:`mining_sources` lists the decision and
    the reason for every candidate file; the manifest records the same list. A photo that a future
    package version adds is picked up by the rule; a new synthetic image needs a line in
    :data:`EXCLUDED`.

Crops
    The ``n`` crops are dealt round-robin over the source photos, sorted by (package, path): crop
    ``i`` comes from photo ``i % P``, so every photo gives ``n // P`` or ``n // P + 1`` crops. The
    ``k``-th crop of a photo is a square whose side is ``SCALES[k % 4]`` (25%, 40%, 60% or 85%)
    of the photo's short side, but at least :data:`MIN_CROP_SIDE` pixels, at a random position
    drawn from ``numpy.random.default_rng([seed, crc32("<package>/<path>")])`` (one generator per
    photo, so adding a photo changes no other photo's crops). Each position is the best of
    :data:`CANDIDATES` random draws: the one overlapping least (largest IoU) with the photo's
    earlier crops, which spreads the crops over the photo. Each crop is mirrored left-right with
    probability 1/2, resized to ``size`` x ``size`` with PIL's Lanczos filter and saved as an RGB
    JPEG (quality :data:`JPEG_QUALITY`, no chroma subsampling). A draw is rejected and redrawn if
    it repeats an earlier box and flip of the photo, if the crop is almost uniform (luminance
    standard deviation below :data:`MIN_CROP_STD`, e.g. the black border of the retina photo), or
    if its JPEG bytes equal an earlier crop's, so all ``n`` files are distinct. The same arguments
    give byte-identical files and manifest (on the same Pillow/libjpeg).

Cache
    The set is built once into ``<root>/mining-v1-n{n}-s{size}-seed{seed}/`` (files
    ``crop_0000_<photo>.jpg`` ... and ``manifest.json``) and reused afterwards. ``<root>`` is the
    ``cache_dir`` argument, else ``$CONVLENS_CACHE``, else ``$XDG_CACHE_HOME/convlens``, else
    ``~/.cache/convlens``. It is built in a uniquely named staging folder next to the final one,
    which is renamed into place when complete; an interrupted build leaves no half-written set, a
    concurrent build that wins the rename is used and ours removed. A final folder whose manifest
    is missing, unreadable, for other parameters, or whose files are missing or altered (sha256)
    is rebuilt. Delete the folder to rebuild by hand.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import re
import secrets
import shutil
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from convlens.data.images import load_image
from convlens.errors import ConvlensError, ImageError

__all__ = [
    "CACHE_ENV",
    "CANDIDATES",
    "EXCLUDED",
    "JPEG_QUALITY",
    "MIN_CROP_SIDE",
    "MIN_CROP_STD",
    "MIN_SOURCES",
    "MIN_SOURCE_SIDE",
    "MINING_VERSION",
    "SCALES",
    "MiningSource",
    "cache_root",
    "mining_set",
    "mining_sources",
]

#: Bumped whenever the recipe changes what a given (n, size, seed) produces; part of the folder name.
MINING_VERSION = "mining-v1"
#: Environment variable naming the cache root (before ``$XDG_CACHE_HOME/convlens``).
CACHE_ENV = "CONVLENS_CACHE"
#: Crop sides as fractions of the photo's short side, cycled per photo.
SCALES: tuple[float, ...] = (0.25, 0.40, 0.60, 0.85)
#: Smallest crop side in source pixels (a smaller crop would be upsampled more than ~2x at 224).
MIN_CROP_SIDE = 112
#: Photos whose short side is below this are left out (thumbnails, icons).
MIN_SOURCE_SIDE = 128
#: Fewer source photos than this is an error: the set would be a handful of pictures.
MIN_SOURCES = 8
#: Random positions drawn per crop; the one overlapping the photo's earlier crops least is kept.
CANDIDATES = 8
#: Crops whose luminance standard deviation (0-255) is below this are redrawn as blank.
MIN_CROP_STD = 4.0
#: JPEG quality of the crop files.
JPEG_QUALITY = 92

_MANIFEST = "manifest.json"
_SCHEMA_VERSION = 1
_MAX_DRAWS = 200  # redraws per crop before a photo is declared exhausted
_STALE_S = 3600.0  # staging folders older than this are leftovers of a dead build

_SKIMAGE = "scikit-image"
_SKLEARN = "scikit-learn"
_MATPLOTLIB = "matplotlib"

#: Files that match the source patterns but are not natural photos: (package, path relative to the
#: package folder) -> why they are left out. See the module docstring for the automatic rules.
EXCLUDED: dict[tuple[str, str], str] = {
    (_SKIMAGE, "data/chessboard_GRAY.png"): "synthetic chessboard",
    (_SKIMAGE, "data/chessboard_RGB.png"): "synthetic chessboard",
    (_SKIMAGE, "data/color.png"): "synthetic colour wheel",
    (_SKIMAGE, "data/logo.png"): "logo (graphic, not a photo)",
    (_SKIMAGE, "data/horse.png"): "binary horse silhouette",
    (_SKIMAGE, "data/phantom.png"): "synthetic Shepp-Logan phantom",
    (_SKIMAGE, "data/text.png"): "text (handwritten characters)",
    (_SKIMAGE, "data/page.png"): "text (scanned book page)",
    (_SKIMAGE, "data/cell.png"): "quantitative phase image from a hologram, not a photo",
    (_SKIMAGE, "data/microaneurysms.png"): "tiny retina patch (102 px)",
    (_MATPLOTLIB, "mpl-data/sample_data/logo2.png"): "logo (graphic, not a photo)",
    (_MATPLOTLIB, "mpl-data/sample_data/Minduka_Present_Blue_Pack.png"): "clip-art icon",
}

_PATTERNS = ("*.png", "*.jpg", "*.jpeg")


@dataclass(frozen=True)
class MiningSource:
    """One candidate file and the decision about it.

    Attributes:
        name: short unique name used in crop file names (the file stem, made unique).
        package: the shipping package: ``"scikit-image"``, ``"scikit-learn"`` or ``"matplotlib"``.
        relpath: path relative to the package folder, e.g. ``"data/coffee.png"``.
        path: absolute path on this machine.
        width: image width in pixels (0 when it could not be read).
        height: image height in pixels (0 when it could not be read).
        reason: why the file is left out; ``""`` for a used photo.
    """

    name: str
    package: str
    relpath: str
    path: Path
    width: int = 0
    height: int = 0
    reason: str = ""

    @property
    def used(self) -> bool:
        """Whether the photo is a source of the mining set."""
        return not self.reason


# -- sources -----------------------------------------------------------------------------------


def _package_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _source_folders() -> tuple[list[tuple[str, Path, Path]], list[str]]:
    """``(package, package folder, image folder)`` for each present package, and what is missing."""
    found: list[tuple[str, Path, Path]] = []
    missing: list[str] = []
    for dist, module, sub in (
        (_SKIMAGE, "skimage", "data"),
        (_SKLEARN, "sklearn", "datasets/images"),
    ):
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            missing.append(f"{dist} (not installed)")
            continue
        pkg = Path(next(iter(spec.submodule_search_locations)))
        folder = pkg / sub
        if folder.is_dir():
            found.append((dist, pkg, folder))
        else:
            missing.append(f"{dist} ({folder} absent)")
    try:
        import matplotlib
    except ImportError:
        missing.append(f"{_MATPLOTLIB} (not installed)")
    else:
        pkg = Path(matplotlib.__file__).parent
        folder = Path(matplotlib.get_data_path()) / "sample_data"
        if folder.is_dir():
            found.append((_MATPLOTLIB, pkg, folder))
        else:
            missing.append(f"{_MATPLOTLIB} ({folder} absent)")
    return found, missing


def _relpath(path: Path, pkg: Path, folder: Path) -> str:
    with contextlib.suppress(ValueError):
        return path.relative_to(pkg).as_posix()
    # a data folder outside the package (unusual matplotlib layouts): relative to its parent
    return path.relative_to(folder.parent).as_posix()


def _rule_out(path: Path) -> tuple[str, int, int]:
    """The automatic rules: ``(reason or "", width, height)`` from the header alone."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            frames = getattr(img, "n_frames", 1)
            alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    except Exception as exc:  # anything PIL cannot parse is simply not a source
        return f"cannot be read ({type(exc).__name__})", 0, 0
    if frames > 1:
        return f"{frames} frames, not a single 2-D image", width, height
    if alpha:
        return "has an alpha channel (a cut-out or graphic, not a photo)", width, height
    if min(width, height) < MIN_SOURCE_SIDE:
        return f"too small ({width}x{height}, short side < {MIN_SOURCE_SIDE})", width, height
    return "", width, height


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "photo"


def mining_sources() -> list[MiningSource]:
    """Every candidate file in the packages' image folders, with the include/exclude decision.

    Sorted by (package, relpath); :attr:`MiningSource.used` marks the photos the mining set uses.
    Only headers are read here (the photos are decoded when the set is built). Missing packages
    contribute nothing.
    """
    folders, _ = _source_folders()
    rows: list[tuple[str, str, Path]] = []
    for dist, pkg, folder in folders:
        files = {p for pattern in _PATTERNS for p in folder.glob(pattern) if p.is_file()}
        rows.extend((dist, _relpath(p, pkg, folder), p) for p in files)
    rows.sort(key=lambda r: (r[0], r[1]))
    stems = [_safe_name(Path(rel).stem) for _, rel, _ in rows]
    out = []
    for (dist, rel, path), stem in zip(rows, stems, strict=True):
        name = stem if stems.count(stem) == 1 else f"{stem}_{_safe_name(dist)}"
        listed = EXCLUDED.get((dist, rel))
        reason, width, height = _rule_out(path)
        out.append(MiningSource(name, dist, rel, path, width, height, listed or reason))
    return out


# -- crops -------------------------------------------------------------------------------------


def _iou(box: tuple[int, int, int, int], others: np.ndarray) -> float:
    """Largest IoU of ``box`` with the rows of ``others`` (``(k, 4)`` x0,y0,x1,y1), 0 if none."""
    if not len(others):
        return 0.0
    x0, y0, x1, y1 = box
    iw = np.clip(np.minimum(x1, others[:, 2]) - np.maximum(x0, others[:, 0]), 0, None)
    ih = np.clip(np.minimum(y1, others[:, 3]) - np.maximum(y0, others[:, 1]), 0, None)
    inter = iw * ih
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    union = (x1 - x0) * (y1 - y0) + areas - inter
    return float((inter / union).max())


def _crop_side(scale: float, short: int) -> int:
    return min(short, max(MIN_CROP_SIDE, round(scale * short)))


def _encode(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=False)
    return buf.getvalue()


def _photo_crops(
    source: MiningSource, count: int, size: int, seed: int, seen: set[str]
) -> list[tuple[dict, bytes]]:
    """The first ``count`` crops of one photo as ``(record, jpeg bytes)``; see the module doc."""
    try:
        photo = load_image(source.path)
    except ImageError as exc:
        raise ConvlensError(f"mining set: {exc}") from exc
    width, height = photo.size
    short = min(width, height)
    rng = np.random.default_rng([seed, zlib.crc32(f"{source.package}/{source.relpath}".encode())])
    boxes = np.zeros((0, 4), dtype=np.int64)
    used: set[tuple[int, int, int, int, bool]] = set()
    out: list[tuple[dict, bytes]] = []
    for k in range(count):
        side = _crop_side(SCALES[k % len(SCALES)], short)
        for _ in range(_MAX_DRAWS):
            xs = rng.integers(0, width - side + 1, size=CANDIDATES)
            ys = rng.integers(0, height - side + 1, size=CANDIDATES)
            flipped = bool(rng.random() < 0.5)
            cands = [
                (int(x), int(y), int(x) + side, int(y) + side) for x, y in zip(xs, ys, strict=True)
            ]
            box = min(cands, key=lambda b: _iou(b, boxes))  # first of the least-overlapping
            if (*box, flipped) in used:
                continue
            crop = photo.resize((size, size), Image.Resampling.LANCZOS, box=box)
            if flipped:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if float(np.asarray(crop.convert("L"), dtype=np.float32).std()) < MIN_CROP_STD:
                used.add((*box, flipped))
                continue
            data = _encode(crop)
            digest = hashlib.sha256(data).hexdigest()
            if digest in seen:
                used.add((*box, flipped))
                continue
            break
        else:
            raise ConvlensError(
                f"mining set: {source.package}/{source.relpath}: no new distinct crop after "
                f"{_MAX_DRAWS} draws (crop {k + 1} of {count}); use a smaller n"
            )
        used.add((*box, flipped))
        seen.add(digest)
        boxes = np.vstack([boxes, np.asarray(box, dtype=np.int64)])
        record = {
            "package": source.package,
            "path": source.relpath,
            "box": list(box),
            "scale": round(side / short, 3),  # crop side / short side
            "flipped": flipped,
            "sha256": digest,
            "bytes": len(data),
        }
        out.append((record, data))
    return out


# -- cache -------------------------------------------------------------------------------------


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache root: ``cache_dir``, else ``$CONVLENS_CACHE``, else ``$XDG_CACHE_HOME/convlens``,
    else ``~/.cache/convlens`` (empty variables count as unset)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "convlens"


def _folder_name(n: int, size: int, seed: int) -> str:
    return f"{MINING_VERSION}-n{n}-s{size}-seed{seed}"


def _params(n: int, size: int, seed: int) -> dict:
    return {
        "version": MINING_VERSION,
        "n": n,
        "size": size,
        "seed": seed,
        "scales": list(SCALES),
        "min_crop_side": MIN_CROP_SIDE,
        "min_source_side": MIN_SOURCE_SIDE,
        "candidates": CANDIDATES,
        "min_crop_std": MIN_CROP_STD,
        "filter": "lanczos",
        "format": "jpeg",
        "jpeg_quality": JPEG_QUALITY,
        "subsampling": "4:4:4",
    }


def _complete(folder: Path, n: int, size: int, seed: int) -> list[Path] | None:
    """The crop files of a finished set in ``folder``, or ``None`` if anything is off."""
    try:
        manifest = json.loads((folder / _MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("schema_version") != _SCHEMA_VERSION:
            return None
        if manifest.get("params") != _params(n, size, seed):
            return None
        crops = manifest["crops"]
        if len(crops) != n:
            return None
        files = []
        for crop in crops:
            path = folder / crop["file"]
            if Path(crop["file"]).name != crop["file"]:
                return None
            data = path.read_bytes()
            if len(data) != crop["bytes"] or hashlib.sha256(data).hexdigest() != crop["sha256"]:
                return None
            files.append(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return sorted(files)


def _sweep(root: Path, final_name: str) -> None:
    """Remove this set's dead staging folders (older than an hour) and abandoned old copies."""
    now = time.time()
    for entry in root.glob(f".{final_name}.*"):
        try:
            stale = ".old-" in entry.name or now - entry.stat().st_mtime > _STALE_S
        except OSError:
            continue
        if stale:
            _remove(entry)


def _remove(path: Path) -> None:
    """Delete a folder or file, ignoring errors (another process may be deleting it too)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _publish(staging: Path, final: Path, n: int, size: int, seed: int) -> list[Path]:
    """Rename ``staging`` to ``final``; a valid ``final`` from a concurrent build wins."""
    for _ in range(5):
        try:
            os.rename(staging, final)
        except OSError:
            theirs = _complete(final, n, size, seed)
            if theirs is not None:
                shutil.rmtree(staging, ignore_errors=True)
                return theirs
            # an incomplete or corrupt set is in the way: move it aside, then try again
            old = final.with_name(f".{final.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
            with contextlib.suppress(FileNotFoundError):
                os.rename(final, old)
            _remove(old)
            continue
        files = _complete(final, n, size, seed)
        if files is None:  # pragma: no cover - only if the folder is altered under us
            raise ConvlensError(f"{final}: mining set changed while being published")
        return files
    shutil.rmtree(staging, ignore_errors=True)
    raise ConvlensError(f"{final}: cannot publish the mining set (folder keeps changing)")


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ConvlensError(f"mining_set {name}={value!r}: must be an integer >= {low}")
    return int(value)


def mining_set(
    n: int = 512,
    size: int = 224,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[Path]:
    """The ``n`` crop files of the embedded mining set, sorted (``crop_0000_<photo>.jpg`` ...).

    Built on the first call into ``<root>/mining-v1-n{n}-s{size}-seed{seed}/`` (see
    :func:`cache_root` and the module docstring for sources, crops and caching) and reused
    afterwards without writing anything. ``progress(1)`` is called per crop written (not on reuse).

    Raises:
        ConvlensError: bad arguments, fewer than :data:`MIN_SOURCES` source photos (the message
            names the missing packages), or a cache folder that cannot be written.
    """
    n = _check_int("n", n, 1)
    size = _check_int("size", size, 8)
    seed = _check_int("seed", seed, 0)
    root = cache_root(cache_dir)
    final = root / _folder_name(n, size, seed)
    files = _complete(final, n, size, seed)
    if files is not None:
        return files

    sources = mining_sources()
    photos = [s for s in sources if s.used]
    if len(photos) < MIN_SOURCES:
        _, missing = _source_folders()
        what = "; missing: " + ", ".join(missing) if missing else ""
        raise ConvlensError(
            f"mining set: only {len(photos)} source photo(s) found, need at least {MIN_SOURCES}"
            f" (install scikit-image, scikit-learn and matplotlib){what}"
        )

    try:
        root.mkdir(parents=True, exist_ok=True)
        _sweep(root, final.name)
        # os.mkdir (not tempfile.mkdtemp, which makes 0700) so the folder gets the umask's mode
        staging = final.with_name(f".{final.name}.staging-{os.getpid()}-{secrets.token_hex(4)}")
        staging.mkdir()
    except OSError as exc:
        raise ConvlensError(f"{root}: cannot create the mining-set cache ({exc})") from exc
    try:
        _build(staging, sources, n, size, seed, progress)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return _publish(staging, final, n, size, seed)


def _build(
    staging: Path,
    sources: list[MiningSource],
    n: int,
    size: int,
    seed: int,
    progress: Callable[[int], None] | None,
) -> None:
    """Write the crops and the manifest (last) into ``staging``."""
    photos = [s for s in sources if s.used]
    count = len(photos)
    digits = max(4, len(str(n - 1)))
    seen: set[str] = set()
    records: list[dict | None] = [None] * n
    for p, source in enumerate(photos):
        quota = n // count + (1 if p < n % count else 0)
        if not quota:
            continue
        for k, (record, data) in enumerate(_photo_crops(source, quota, size, seed, seen)):
            index = k * count + p  # round-robin: crop i comes from photo i % count
            name = f"crop_{index:0{digits}d}_{source.name}.jpg"
            # plain open(): the umask decides the mode (0644), unlike mkstemp's 0600
            (staging / name).write_bytes(data)
            records[index] = {"file": name, **record}
            if progress is not None:
                progress(1)
    manifest = {
        "schema_version": _SCHEMA_VERSION,
        "params": _params(n, size, seed),
        "packages": {pkg: _package_version(pkg) for pkg in sorted({s.package for s in photos})},
        "sources": [
            {
                "name": s.name,
                "package": s.package,
                "path": s.relpath,
                "width": s.width,
                "height": s.height,
                "crops": n // count + (1 if i < n % count else 0),
            }
            for i, s in enumerate(photos)
        ],
        "excluded": [
            {"package": s.package, "path": s.relpath, "reason": s.reason}
            for s in sources
            if not s.used
        ],
        "crops": records,
    }
    # the staging folder is renamed as a whole, so the manifest needs no temporary name of its own
    with open(staging / _MANIFEST, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=2)
        fh.write("\n")
