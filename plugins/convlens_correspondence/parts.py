"""Images with named part boxes: ``parts.json`` files, and the embedded face set.

``parts.json`` maps each image to its parts, boxes in that image's own pixels::

    {
      "dogs/01.jpg": {"right_eye": [112, 80, 140, 102], "left_eye": [...], "nose": [...],
                      "object": [60, 20, 260, 240]},
      "02.jpg": {...}
    }

Keys are image paths relative to the JSON file's folder (or absolute), or a file name that
matches exactly one of the images given with ``--images``. A box is ``[x0, y0, x1, y1]``: pixel
edges, ``x1``/``y1`` exclusive (a box over pixels 3..5 is ``[3, 3, 6, 6]``); numbers may be
fractional. ``"object"`` is reserved: it is not masked as a part but bounds where the random
baseline's masks may go (Section 4.3: "random parts of the object").

The embedded set (:func:`embedded_faces`) is five frontal faces of scikit-image's LFW subset
(``skimage/data/lfw_subset.npy``, 25x25 grey crops) with hand-placed boxes for both eyes and the
nose: a miniature of Table 1 on human faces, not the paper's five dogs. ``right_eye`` is the
subject's right eye, on the image's left.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from convlens.data import SkippedImageWarning, iter_images, lfw_faces, load_image
from convlens.errors import ConvlensError

__all__ = [
    "PartImage",
    "OBJECT",
    "FACE_PARTS",
    "embedded_faces",
    "read_parts",
    "write_face_parts",
]

#: The reserved part name bounding the random baseline's masks.
OBJECT = "object"

#: Boxes of the embedded faces, in the 25x25 crop's pixels, keyed by the face's index in
#: ``lfw_subset.npy``. Placed by eye on 14x enlargements (checked by drawing them; see
#: docs/probes/correspondence.md). Embedded as Python rather than a JSON data file so that a
#: non-editable install (whose package data covers only ``convlens``) carries them too.
FACE_PARTS: dict[int, dict[str, tuple[int, int, int, int]]] = {
    3: {
        "right_eye": (3, 7, 9, 11),
        "left_eye": (12, 7, 18, 11),
        "nose": (9, 11, 14, 16),
        OBJECT: (2, 2, 21, 23),
    },
    7: {
        "right_eye": (3, 6, 9, 10),
        "left_eye": (12, 6, 18, 10),
        "nose": (9, 10, 13, 16),
        OBJECT: (2, 2, 20, 22),
    },
    60: {
        "right_eye": (2, 6, 8, 10),
        "left_eye": (13, 6, 19, 10),
        "nose": (8, 10, 13, 16),
        OBJECT: (1, 2, 21, 23),
    },
    62: {
        "right_eye": (2, 7, 8, 11),
        "left_eye": (12, 7, 18, 11),
        "nose": (8, 10, 13, 15),
        OBJECT: (1, 2, 19, 22),
    },
    66: {
        "right_eye": (2, 6, 8, 10),
        "left_eye": (13, 6, 19, 10),
        "nose": (8, 10, 13, 15),
        OBJECT: (1, 2, 21, 23),
    },
}


@dataclass
class PartImage:
    """One image of a correspondence set: its name, where it came from, the RGB image and its
    part boxes (image pixels). ``object_box`` bounds the random masks (``None``: whole image)."""

    name: str
    source: str
    image: Image.Image
    parts: dict[str, tuple[float, float, float, float]]
    object_box: tuple[float, float, float, float] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def embedded_faces() -> list[PartImage]:
    """The five embedded LFW faces as RGB images (grey replicated), 25x25, with their boxes."""
    faces = lfw_faces(None)
    out = []
    for idx, boxes in FACE_PARTS.items():
        arr = np.clip(np.round(faces[idx] * 255.0), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L").convert("RGB")
        parts = {k: tuple(float(v) for v in b) for k, b in boxes.items() if k != OBJECT}
        out.append(
            PartImage(
                name=f"lfw_{idx:03d}",
                source=f"skimage/data/lfw_subset.npy[{idx}]",
                image=img,
                parts=parts,  # type: ignore[arg-type]
                object_box=tuple(float(v) for v in boxes[OBJECT]),  # type: ignore[arg-type]
            )
        )
    return out


def write_face_parts(folder: str | Path) -> Path:
    """Write the embedded faces as PNGs plus their ``parts.json`` into ``folder`` (an example of
    the user format; ``convlens probe correspondence --images F --parts F/parts.json`` then gives
    the same numbers as the embedded default). Returns the JSON's path."""
    from convlens.io import atomic_path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {}
    for face in embedded_faces():
        name = f"{face.name}.png"
        with atomic_path(folder / name) as tmp:
            face.image.save(tmp, format="PNG")
        boxes = {k: list(v) for k, v in face.parts.items()}
        if face.object_box is not None:
            boxes[OBJECT] = list(face.object_box)
        data[name] = boxes
    path = folder / "parts.json"
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


def _box(value: Any, where: str) -> tuple[float, float, float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise ConvlensError(f"{where}: expected [x0, y0, x1, y1], got {value!r}")
    try:
        b = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ConvlensError(f"{where}: expected four numbers, got {value!r}") from None
    if not all(math.isfinite(v) for v in b) or isinstance(value[0], bool):
        raise ConvlensError(f"{where}: expected four finite numbers, got {value!r}")
    if not (b[0] < b[2] and b[1] < b[3]):
        raise ConvlensError(f"{where}: needs x0 < x1 and y0 < y1, got {value!r}")
    return b  # type: ignore[return-value]


def _load_json(path: Path) -> dict[str, dict[str, tuple[float, float, float, float]]]:
    """The file's entries with every box validated (before any image is opened)."""
    if not path.is_file():
        raise ConvlensError(f"{path}: no such parts file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConvlensError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict) or not data:
        raise ConvlensError(f"{path}: expected an object mapping image → part name → box")
    out = {}
    for key, parts in data.items():
        if not isinstance(parts, dict) or not parts:
            raise ConvlensError(f"{path}: entry {key!r} must map part names to boxes")
        out[key] = {
            str(name): _box(value, f"{path}: {key} → {name}") for name, value in parts.items()
        }
        if not set(out[key]) - {OBJECT}:
            raise ConvlensError(f"{path}: {key} has no part boxes (only {OBJECT!r})")
    return out


def _find(images: list[Path], parts_file: Path) -> list[tuple[Path, Image.Image]]:
    """The images under ``images``; the parts file itself, when it sits in a given folder, is
    not reported as a skipped non-image."""
    own = parts_file.resolve()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = list(iter_images(images))
    for w in caught:
        if issubclass(w.category, SkippedImageWarning) and str(w.message).startswith(
            (str(parts_file), str(own))
        ):
            continue
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return found


def read_parts(parts_file: str | Path, images: list[Path] | None = None) -> list[PartImage]:
    """Images and their part boxes from ``parts_file``.

    ``images=None``: the images are the JSON's keys (paths relative to its folder). Otherwise
    every image found under ``images`` (files and folders) must match one key — by path, or by
    file name when that is unique — and keys that match none are reported with a warning.

    Raises:
        ConvlensError: an unreadable file, a malformed box, an image without an entry, a box
            outside its image, or fewer than two images.
    """
    path = Path(parts_file)
    entries = _load_json(path)
    base = path.resolve().parent
    loaded: list[tuple[str, Path, Image.Image]] = []
    if images is None:
        for key in entries:
            p = Path(key)
            p = p if p.is_absolute() else base / p
            if not p.is_file():
                raise ConvlensError(f"{path}: image {key!r} not found (looked for {p})")
            loaded.append((key, p, load_image(p)))
    else:
        found = _find(list(images), path)
        by_path = {}
        names: dict[str, list[str]] = {}
        for key in entries:
            p = Path(key)
            by_path[(p if p.is_absolute() else base / p).resolve()] = key
            names.setdefault(p.name, []).append(key)
        image_names: dict[str, int] = {}
        for p, _ in found:
            image_names[p.name] = image_names.get(p.name, 0) + 1
        for p, img in found:
            key = by_path.get(Path(p).resolve())
            if key is None and len(names.get(p.name, [])) == 1 and image_names[p.name] == 1:
                key = names[p.name][0]
            if key is None:
                raise ConvlensError(f"{p}: no entry in {path} (keys are image paths or names)")
            loaded.append((key, p, img))
        used = {k for k, _, _ in loaded}
        unused = [k for k in entries if k not in used]
        if unused:
            warnings.warn(
                f"{path}: {len(unused)} entr{'y' if len(unused) == 1 else 'ies'} matched no "
                f"given image and {'is' if len(unused) == 1 else 'are'} ignored: "
                + ", ".join(unused[:5]),
                stacklevel=2,
            )
    out = []
    for key, p, img in loaded:
        w, h = img.size
        parts = {}
        for name, b in entries[key].items():
            if b[2] <= 0 or b[3] <= 0 or b[0] >= w or b[1] >= h:
                raise ConvlensError(
                    f"{path}: {key} → {name}: box {list(b)} lies outside the {w}x{h} image"
                )
            parts[name] = b
        object_box = parts.pop(OBJECT, None)
        out.append(
            PartImage(
                name=Path(key).stem, source=str(p), image=img, parts=parts, object_box=object_box
            )
        )
    if len(out) < 2:
        raise ConvlensError(f"{path}: correspondence needs at least 2 images, got {len(out)}")
    return out
