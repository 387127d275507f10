"""The embedded miniature's data: an ImageFolder of generated pictures whose classes need spatial
features (oriented edges, shapes, colour) rather than any single pixel statistic.

    from convlens_zeiler_fergus.synthetic import CLASSES, render, write_image_folder
    write_image_folder("runs/zeiler-fergus/data", train_per_class=400, val_per_class=100)

Twelve classes (chance 8.3 %): horizontal, vertical and diagonal stripes (textures whose only
difference is orientation, so layer 1 must grow oriented edge filters; every class is closed under
the horizontal flips of training), a checkerboard and a dot lattice, five filled or
outlined shapes at random position, size, rotation and colour (so colour alone decides nothing),
and two kinds of smooth colour blobs, warm and cool (so colour-opponent filters pay off, and shapes
must be told from blobs by their sharp edges). Every picture has random colours, a noisy
background and pixel noise. Picture ``i`` of a split is a pure function of ``(seed, split, class,
i)``: the folder is the same on every machine.

The folder is then read exactly as ImageNet is (``data.py``): smallest side resized, centre crop,
per-pixel mean, random crops and flips, ten-crop evaluation.
"""

from __future__ import annotations

import colorsys
import functools
import hashlib
import json
import multiprocessing as mp
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from convlens.io import write_json

__all__ = ["CLASSES", "render", "write_image_folder", "DEFAULT_SIZE"]

CLASSES: tuple[str, ...] = (
    "stripes_horizontal",
    "stripes_vertical",
    "stripes_diagonal",
    "checkerboard",
    "dots",
    "disc",
    "square",
    "triangle",
    "cross",
    "ring",
    "blobs_warm",
    "blobs_cool",
)
DEFAULT_SIZE = 80
# direction of the stripes' normal (degrees); the diagonal class takes either diagonal, because
# the paper's horizontal flips map one onto the other
_STRIPE_ANGLE = {0: 90.0, 1: 0.0}


def _seed(*parts: object) -> int:
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _colour(rng: np.random.Generator, hue: float | None = None) -> np.ndarray:
    h = rng.uniform(0, 1) if hue is None else hue
    s = rng.uniform(0.35, 1.0)
    v = rng.uniform(0.3, 1.0)
    return np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32) * np.float32(255.0)


def _two_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and background colours that differ visibly (in luminance or strongly in hue)."""
    lum = np.array([0.299, 0.587, 0.114])
    for _ in range(50):
        a, b = _colour(rng), _colour(rng)
        if abs(float(lum @ a - lum @ b)) > 50 or np.abs(a - b).max() > 140:
            return a, b
    return np.array([230.0, 230, 230]), np.array([20.0, 20, 20])


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1]: a coarse random grid upsampled bicubically."""
    coarse = (rng.uniform(0, 255, (cells, cells))).astype(np.uint8)
    img = Image.fromarray(coarse, mode="L").resize((size, size), Image.Resampling.BICUBIC)
    f = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    return (f - f.min()) / max(f.max() - f.min(), 1e-6)


@functools.lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + np.float32(0.5)
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def render(label: int, seed: int, size: int = DEFAULT_SIZE) -> np.ndarray:
    """Picture number ``seed`` of class ``label``: ``[size, size, 3]`` uint8 RGB."""
    if not 0 <= label < len(CLASSES):
        raise ValueError(f"label {label} outside 0..{len(CLASSES) - 1}")
    rng = np.random.default_rng(seed)
    yy, xx = _grid(size)
    fg, bg = _two_colours(rng)
    # background: a colour with a smooth luminance wash
    wash = _smooth_field(rng, size, 3)[..., None] - 0.5
    canvas = bg[None, None, :] * (1.0 + 0.3 * wash)
    name = CLASSES[label]
    if label <= 4:  # textures over a random window covering most of the picture
        if label == 2:
            base = 45.0 if rng.uniform() < 0.5 else 135.0
        else:
            base = _STRIPE_ANGLE.get(label, rng.uniform(0, 180))
        theta = np.deg2rad(base + rng.uniform(-8, 8))
        period = rng.uniform(0.07, 0.14) * size
        u = xx * np.cos(theta) + yy * np.sin(theta)
        phase = rng.uniform(0, 2 * np.pi)
        v = -xx * np.sin(theta) + yy * np.cos(theta)
        if name == "checkerboard":
            wave = np.sin(2 * np.pi * u / period + phase) * np.sin(2 * np.pi * v / period)
        elif name == "dots":
            wave = np.cos(2 * np.pi * u / period + phase) + np.cos(2 * np.pi * v / period) - 1.2
        else:
            wave = np.sin(2 * np.pi * u / period + phase)
        alpha = np.clip(0.5 + 2.5 * wave, 0.0, 1.0)
        lo, hi = sorted(rng.uniform(0.0, 0.35, 2)), sorted(rng.uniform(0.65, 1.0, 2))
        y0, y1 = int(lo[0] * size), int(hi[0] * size)
        x0, x1 = int(lo[1] * size), int(hi[1] * size)
        window = np.zeros((size, size))
        window[y0:y1, x0:x1] = 1.0
        alpha = alpha * window
    elif label <= 9:  # shapes
        r = rng.uniform(0.17, 0.32) * size
        cy, cx = rng.uniform(r + 2, size - r - 2, 2)
        dy, dx = yy - cy, xx - cx
        theta = rng.uniform(0, 2 * np.pi)
        u = dx * np.cos(theta) + dy * np.sin(theta)
        v = -dx * np.sin(theta) + dy * np.cos(theta)
        d = np.hypot(dx, dy)
        if name == "disc":
            sd = d - r
        elif name == "square":
            sd = np.maximum(np.abs(u), np.abs(v)) - r * 0.8
        elif name == "triangle":
            phis = theta + np.deg2rad(270.0 + 120.0 * np.arange(3))
            proj = np.stack([dx * np.cos(p) + dy * np.sin(p) for p in phis])
            sd = proj.max(0) - r * 0.55
        elif name == "cross":
            w = r / 3.2
            sd = np.minimum(
                np.maximum(np.abs(u) - w, np.abs(v) - r), np.maximum(np.abs(v) - w, np.abs(u) - r)
            )
        else:  # ring
            t = rng.uniform(0.2, 0.35) * r
            sd = np.maximum(d - r, (r - t) - d)
        alpha = np.clip(0.5 - sd, 0.0, 1.0)
    else:  # smooth colour blobs: hue decides the class, no sharp edges anywhere
        hue_lo, hue_hi = (-0.05, 0.15) if name == "blobs_warm" else (0.45, 0.70)
        field_a = _smooth_field(rng, size, int(rng.integers(3, 6)))
        c1 = _colour(rng, rng.uniform(hue_lo, hue_hi) % 1.0)
        c2 = _colour(rng, rng.uniform(hue_lo, hue_hi) % 1.0)
        blob = field_a[..., None] * c1 + (1 - field_a[..., None]) * c2
        mask = _smooth_field(rng, size, 4)
        alpha = np.clip((mask - 0.25) * 3.0, 0.0, 1.0)
        canvas = canvas * (1 - alpha[..., None]) + blob * alpha[..., None]
        alpha = np.zeros((size, size))
    canvas = canvas * (1 - alpha[..., None]) + fg[None, None, :] * alpha[..., None]
    canvas = canvas + 8.0 * rng.standard_normal(canvas.shape, dtype=np.float32)
    return np.clip(canvas + 0.5, 0, 255).astype(np.uint8)


def write_image_folder(
    root: str | Path,
    train_per_class: int = 400,
    val_per_class: int = 100,
    size: int = DEFAULT_SIZE,
    seed: int = 1234,
    workers: int = 2,
) -> Path:
    """Write ``root/{train,val}/<class>/<i>.png`` (skipped when ``root/dataset.json`` already
    describes the same parameters; otherwise ``root/train`` and ``root/val`` are replaced),
    with ``workers`` processes. Returns ``root``."""
    root = Path(root)
    params = {
        "generator": "convlens_zeiler_fergus.synthetic",
        "classes": list(CLASSES),
        "train_per_class": train_per_class,
        "val_per_class": val_per_class,
        "size": size,
        "seed": seed,
    }
    marker = root / "dataset.json"
    if marker.exists():
        try:
            old = json.loads(marker.read_text())
            if {k: old.get(k) for k in params} == params:
                return root
        except (OSError, json.JSONDecodeError):
            pass
        marker.unlink()
    for split in ("train", "val"):  # a partial or different earlier folder of ours
        if (root / split).is_dir():
            shutil.rmtree(root / split)
    jobs = [
        (str(root), split, label, n, size, seed)
        for split, n in (("train", train_per_class), ("val", val_per_class))
        for label in range(len(CLASSES))
    ]
    procs = min(workers, len(jobs)) if workers > 0 else 0
    if procs > 1 and "fork" in mp.get_all_start_methods():
        # fork: the children only run NumPy and PIL (never torch), and start instantly
        with ProcessPoolExecutor(procs, mp_context=mp.get_context("fork")) as pool:
            list(pool.map(_write_class, jobs))
    else:
        for job in jobs:
            _write_class(job)
    write_json(marker, params)
    return root


def _write_class(job: tuple[str, str, int, int, int, int]) -> None:
    root, split, label, n, size, seed = job
    name = CLASSES[label]
    folder = Path(root) / split / name
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = render(label, _seed(seed, split, label, i), size)
        # no temporary names per picture: dataset.json, written last, marks the folder
        # complete, and an interrupted folder is simply written again
        Image.fromarray(arr).save(folder / f"{name}_{i:05d}.png", format="PNG", compress_level=1)
