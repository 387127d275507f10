"""The input path of Section 3: ImageFolder → 256×256 centre crops → per-pixel mean → random
224 crops with flips (training) or ten crops (evaluation).

    from convlens_zeiler_fergus.data import prepare_data, pack
    bundle = prepare_data(cfg, dist, device)          # scan, (pack), mean image, datasets
    python -m convlens_zeiler_fergus.data pack /data/imagenet --out /fast/imagenet-packed

Section 3: "Each RGB image was preprocessed by resizing the smallest dimension to 256, cropping
the center 256x256 region, subtracting the per-pixel mean (across all images) and then using 10
different sub-crops of size 224x224 (corners + center with(out) horizontal flips)."

How it is split between CPU and accelerator, so that the GPU never waits:

* **workers** (DataLoader, pinned memory) only produce the 256×256 centre crops as uint8:
  from JPEG/PNG files (PIL, the same geometry as :class:`convlens.data.Preprocess`), from the raw
  file bytes (``decode="device"``: ``torchvision.io.decode_jpeg(device="cuda")`` decodes and
  resizes whole batches on the GPU), or from a **pack** (:func:`pack`: sharded uint8 memmaps of
  the crops, written once, read at memory speed).
* **the device** does the rest in one gather (:class:`BatchPrep`): uint8 → float, minus the
  per-pixel mean image, random crop and flip per sample, out in ``channels_last`` layout.

Randomness never lives in the workers: the epoch's order is a permutation seeded by
``(seed, epoch)`` and each step's crops and flips by ``(seed, epoch, step)``
(:class:`EpochBatchSampler`, :func:`crop_params`), so a run resumed mid-epoch, or spread over any
number of DDP ranks, sees exactly the batches of an uninterrupted single-process run.

Disk for a pack of ImageNet-1k at 256×256: 196,608 bytes per image, i.e. 251.9 GB (234.6 GiB) for
the 1,281,167 training images and 9.8 GB (9.2 GiB) for the 50,000 validation images.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from convlens.data import Preprocess, load_image
from convlens.errors import ConvlensError
from convlens.io import atomic_path, write_json
from convlens_zeiler_fergus.config import TrainConfig
from convlens_zeiler_fergus.distributed import DistEnv

__all__ = [
    "IMAGE_EXTENSIONS",
    "Split",
    "scan_split",
    "FolderDataset",
    "EncodedDataset",
    "PackedDataset",
    "pack",
    "read_pack_info",
    "compute_mean_image",
    "EpochBatchSampler",
    "crop_params",
    "BatchPrep",
    "decode_batch",
    "DataBundle",
    "prepare_data",
    "default_cache_dir",
    "bytes_per_image",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
JPEG_EXTENSIONS = (".jpg", ".jpeg")
PACK_FORMAT = "convlens-zf-pack"
SHARD_SIZE = 10_000


def bytes_per_image(size: int = 256) -> int:
    """Disk per packed image: ``3·size²`` bytes (196,608 at 256)."""
    return 3 * size * size


# --------------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------------


@dataclass
class Split:
    """One split of an ImageFolder: ``samples`` are ``(path, class index)``."""

    root: Path
    classes: list[str]
    samples: list[tuple[str, int]]

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> np.ndarray:
        return np.fromiter((s[1] for s in self.samples), dtype=np.int64, count=len(self.samples))

    def fingerprint(self, size: int) -> str:
        """A key for caches: the root, the crop size, the number of files and a sample of names."""
        h = hashlib.sha1()
        h.update(f"{self.root.resolve()}|{size}|{len(self.samples)}|{len(self.classes)}".encode())
        step = max(1, len(self.samples) // 64)
        for path, label in self.samples[::step]:
            h.update(f"{os.path.relpath(path, self.root)}:{label}".encode())
        return h.hexdigest()[:16]


def scan_split(root: str | Path, split: str, classes: Sequence[str] | None = None) -> Split:
    """``root/split/<class>/<image>`` → a :class:`Split` (classes sorted by folder name, files
    sorted within each). ``classes`` fixes the class order (the validation split uses the
    training split's)."""
    folder = Path(root) / split
    if not folder.is_dir():
        raise ConvlensError(
            f"{folder}: no such folder (expected the ImageFolder layout {split}/<class>/<image>)"
        )
    found = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if not found:
        raise ConvlensError(f"{folder}: no class folders in it")
    order = list(classes) if classes is not None else found
    index = {c: i for i, c in enumerate(order)}
    unknown = [c for c in found if c not in index]
    if unknown:
        raise ConvlensError(f"{folder}: class folder {unknown[0]!r} is not a training class")
    samples: list[tuple[str, int]] = []
    for c in found:
        names = sorted(
            e.name
            for e in os.scandir(folder / c)
            if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
        )
        samples += [(str(folder / c / n), index[c]) for n in names]
    if not samples:
        raise ConvlensError(f"{folder}: no images (extensions {', '.join(IMAGE_EXTENSIONS)})")
    return Split(folder, order, samples)


def _square_crop(size: int) -> Preprocess:
    # The geometry of convlens.data.Preprocess (torchvision's rules): shorter side → size,
    # centre size×size crop; mean/std unused.
    return Preprocess(input_size=(size, size), resize=size, interpolation="bilinear")


def load_square(path: str | Path, size: int) -> np.ndarray:
    """One image file → its centre ``size``×``size`` crop after resizing the shorter side to
    ``size``: uint8 ``[3, size, size]``."""
    img = _square_crop(size).resize_crop(load_image(path))
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


# --------------------------------------------------------------------------------------------
# Datasets: each item is (uint8 [3, S, S] or encoded bytes, label)
# --------------------------------------------------------------------------------------------


class FolderDataset(Dataset):
    """Decode + resize + centre-crop in the worker (PIL)."""

    def __init__(self, split: Split, size: int) -> None:
        self.split, self.size = split, size

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.split.samples[i]
        return torch.from_numpy(load_square(path, self.size)), label


class EncodedDataset(Dataset):
    """The file's bytes only; :func:`decode_batch` decodes whole batches on the device."""

    def __init__(self, split: Split) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        import torchvision.io as tvio

        path, label = self.split.samples[i]
        return tvio.read_file(path), label


def collate_encoded(
    batch: list[tuple[torch.Tensor, int]],
) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """File bytes of a batch as one flat uint8 tensor plus offsets ``[b + 1]`` (one shared
    storage per batch: workers hand over a handful of tensors, not one per image)."""
    sizes = torch.tensor([0] + [len(b[0]) for b in batch], dtype=torch.int64)
    flat = torch.cat([b[0] for b in batch]) if batch else torch.zeros(0, dtype=torch.uint8)
    labels = torch.tensor([b[1] for b in batch], dtype=torch.int64)
    return (flat, sizes.cumsum(0)), labels


def split_encoded(encoded: Any) -> list[torch.Tensor]:
    """:func:`collate_encoded`'s ``(flat, offsets)`` (or a list of byte tensors) → the list."""
    if isinstance(encoded, tuple) and len(encoded) == 2 and isinstance(encoded[0], torch.Tensor):
        flat, offsets = encoded
        bounds = offsets.tolist()
        return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return list(encoded)


class PackedDataset(Dataset):
    """Items of a pack (:func:`pack`), memory-mapped; ``__getitems__`` reads a batch per shard."""

    def __init__(self, pack_dir: str | Path) -> None:
        self.dir = Path(pack_dir)
        self.info = read_pack_info(self.dir)
        self.size = int(self.info["size"])
        self.labels = np.load(self.dir / "labels.npy")
        sizes = [s["n"] for s in self.info["shards"]]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._maps: list[np.ndarray] | None = None  # opened lazily, once per worker process

    def _shards(self) -> list[np.ndarray]:
        if self._maps is None:
            self._maps = [np.load(self.dir / s["file"], mmap_mode="r") for s in self.info["shards"]]
        return self._maps

    def __getstate__(self) -> dict[str, Any]:  # workers re-open their own maps
        state = dict(self.__dict__)
        state["_maps"] = None
        return state

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _locate(self, i: int) -> tuple[int, int]:
        s = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return s, i - int(self.offsets[s])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        s, j = self._locate(int(i))
        return torch.from_numpy(np.array(self._shards()[s][j])), int(self.labels[i])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        idx = np.asarray(indices, dtype=np.int64)
        shard = np.searchsorted(self.offsets, idx, side="right") - 1
        out: list[tuple[torch.Tensor, int] | None] = [None] * len(idx)
        maps = self._shards()
        for s in np.unique(shard):
            where = np.nonzero(shard == s)[0]
            local = idx[where] - self.offsets[s]
            order = np.argsort(local)  # ascending reads are kinder to the page cache
            block = maps[s][local[order]]
            for k, w in enumerate(where[order]):
                out[w] = (torch.from_numpy(block[k]), int(self.labels[idx[w]]))
        return out  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Pack: sharded uint8 memmaps of the centre crops
# --------------------------------------------------------------------------------------------


def read_pack_info(pack_dir: str | Path) -> dict[str, Any]:
    path = Path(pack_dir) / "index.json"
    if not path.is_file():
        raise ConvlensError(f"{pack_dir}: not a complete pack (no index.json; run the pack step)")
    info = json.loads(path.read_text())
    if info.get("format") != PACK_FORMAT:
        raise ConvlensError(f"{path}: not a convlens pack (format {info.get('format')!r})")
    return info


def pack(
    split: Split,
    out_dir: str | Path,
    size: int = 256,
    workers: int = 0,
    shard_size: int = SHARD_SIZE,
    with_mean: bool = True,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Store ``split``'s ``size``×``size`` centre crops as ``shard_NNNNN.npy`` uint8 arrays
    ``[n, 3, size, size]`` plus ``labels.npy``, ``index.json`` (written last: the pack is
    complete when it exists) and, with ``with_mean``, ``mean_image.npy`` (float32 ``[3, S, S]``,
    the per-pixel mean of Section 3, computed on the way).

    Interrupted packs resume: finished shards (renamed into place with their pixel sums) are kept.
    Needs ``3·size²`` bytes per image (see the module docstring for ImageNet)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(split)
    shards = []
    total = np.zeros((3, size, size), dtype=np.float64)
    ds = FolderDataset(split, size)
    for s, start in enumerate(range(0, n, shard_size)):
        stop = min(n, start + shard_size)
        name = f"shard_{s:05d}.npy"
        shards.append({"file": name, "n": stop - start})
        final, sums = out / name, out / f"shard_{s:05d}.sum.npy"
        if final.exists() and sums.exists():
            total += np.load(sums)
            if progress:
                progress(stop - start)
            continue
        shard_sum = np.zeros((3, size, size), dtype=np.float64)
        with atomic_path(final) as tmp:
            arr = np.lib.format.open_memmap(
                tmp, mode="w+", dtype=np.uint8, shape=(stop - start, 3, size, size)
            )
            loader = DataLoader(
                torch.utils.data.Subset(ds, range(start, stop)),
                batch_size=64,
                num_workers=workers,
                shuffle=False,
            )
            k = 0
            for x, _ in loader:
                a = x.numpy()
                arr[k : k + len(a)] = a
                shard_sum += a.sum(0, dtype=np.float64)
                k += len(a)
                if progress:
                    progress(len(a))
            arr.flush()
            del arr
        with atomic_path(sums) as tmp, open(tmp, "wb") as fh:
            np.save(fh, shard_sum)
        total += shard_sum
    with atomic_path(out / "labels.npy") as tmp, open(tmp, "wb") as fh:
        np.save(fh, split.labels.astype(np.int32))
    if with_mean:
        with atomic_path(out / "mean_image.npy") as tmp, open(tmp, "wb") as fh:
            np.save(fh, (total / max(n, 1)).astype(np.float32))
    info = {
        "format": PACK_FORMAT,
        "size": size,
        "n": n,
        "classes": split.classes,
        "source": str(split.root.resolve()),
        "fingerprint": split.fingerprint(size),
        "shards": shards,
        "bytes": n * bytes_per_image(size),
        "mean_image": with_mean,
    }
    write_json(out / "index.json", info)
    return info


# --------------------------------------------------------------------------------------------
# The per-pixel mean image (Section 3), computed once and cached
# --------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "convlens" / "zeiler-fergus"


def compute_mean_image(
    dataset: Dataset,
    size: int,
    dist: DistEnv,
    workers: int = 0,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """The mean over ``dataset``'s uint8 crops, float32 ``[3, size, size]`` in 0–255 units. Each
    DDP rank sums a contiguous chunk; the sums are all-reduced."""
    n = len(dataset)
    lo, hi = dist.chunk(n)
    total = torch.zeros(3, size, size, dtype=torch.float64)
    loader = DataLoader(
        torch.utils.data.Subset(dataset, range(lo, hi)),
        batch_size=batch_size,
        num_workers=workers,
        shuffle=False,
    )
    for x, _ in loader:
        total += x.sum(0, dtype=torch.float64)
        if progress:
            progress(len(x))
    total = dist.all_reduce_sum(total)
    return (total / max(n, 1)).float()


# --------------------------------------------------------------------------------------------
# Order and augmentation, decided outside the workers
# --------------------------------------------------------------------------------------------


def _mix(*parts: int) -> int:
    h = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of one epoch: a permutation of ``range(n)`` seeded by ``(seed, epoch)``, cut into
    ``n // batch_size`` global batches (the incomplete last batch is dropped); rank ``r`` of
    ``world`` takes the ``r``-th contiguous slice of each. ``start_step`` skips the batches a
    resumed run has already trained on."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        epoch: int,
        rank: int = 0,
        world: int = 1,
        start_step: int = 0,
        shuffle: bool = True,
    ) -> None:
        if batch_size % world:
            raise ConvlensError(f"batch size {batch_size} is not divisible by {world} ranks")
        if n < batch_size:
            raise ConvlensError(f"{n} training images are fewer than one batch of {batch_size}")
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, epoch
        self.rank, self.world, self.start_step, self.shuffle = rank, world, start_step, shuffle

    @property
    def steps(self) -> int:
        return self.n // self.batch_size

    def global_batch(self, step: int, perm: torch.Tensor | None = None) -> torch.Tensor:
        perm = self.permutation() if perm is None else perm
        return perm[step * self.batch_size : (step + 1) * self.batch_size]

    def permutation(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(_mix(self.seed, self.epoch, 1))
        return torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator[list[int]]:
        perm = self.permutation()
        b = self.batch_size // self.world
        for step in range(self.start_step, self.steps):
            batch = self.global_batch(step, perm)
            yield batch[self.rank * b : (self.rank + 1) * b].tolist()

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step)


def crop_params(
    seed: int, epoch: int, step: int, n: int, size: int, crop: int, flip: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random crop offsets ``(dy, dx)`` in ``[0, size - crop]`` and flips for the ``n`` images
    of global batch ``step`` of ``epoch`` (int64 / bool tensors on the CPU)."""
    g = torch.Generator().manual_seed(_mix(seed, epoch, step, 2))
    dy = torch.randint(0, size - crop + 1, (n,), generator=g)
    dx = torch.randint(0, size - crop + 1, (n,), generator=g)
    fl = torch.rand(n, generator=g) < 0.5
    if not flip:
        fl = torch.zeros(n, dtype=torch.bool)
    return dy, dx, fl


class BatchPrep:
    """uint8 ``[b, 3, S, S]`` centre crops → the network's float input on the device: minus the
    per-pixel mean image (0–255 units, as the paper's "roughly [-128, 128]" inputs), then
    ``crop``×``crop`` sub-crops with optional horizontal flips, gathered in one indexing op whose
    result is already in ``channels_last`` layout."""

    def __init__(
        self, mean_image: torch.Tensor, crop: int, device: torch.device, channels_last: bool = True
    ) -> None:
        self.mean = mean_image.to(device=device, dtype=torch.float32)
        self.size = int(mean_image.shape[-1])
        self.crop, self.device, self.channels_last = crop, device, channels_last
        self._ar = torch.arange(crop, device=device)

    def _finish(self, out: torch.Tensor) -> torch.Tensor:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return out.contiguous(memory_format=fmt)

    def crops(
        self, x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor
    ) -> torch.Tensor:
        """Per-sample crops at ``(dy, dx)``, flipped where ``flip``: ``[b, 3, crop, crop]``."""
        x = x.to(self.device, non_blocking=True).float().sub_(self.mean)
        dy, dx, flip = (t.to(self.device, non_blocking=True) for t in (dy, dx, flip))
        b, c = x.shape[0], self.crop
        rows = dy[:, None] + self._ar  # [b, c]
        cols = torch.where(flip[:, None], dx[:, None] + (c - 1) - self._ar, dx[:, None] + self._ar)
        bidx = torch.arange(b, device=self.device)[:, None, None]
        # advanced indices around a slice: the result is [b, c, c, 3], i.e. NHWC memory
        out = x[bidx, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
        return self._finish(out)

    def center(self, x: torch.Tensor) -> torch.Tensor:
        o = (self.size - self.crop) // 2
        b = x.shape[0]
        z = torch.full((b,), o, dtype=torch.int64)
        return self.crops(x, z, z, torch.zeros(b, dtype=torch.bool))

    def views(self, x: torch.Tensor, n_crops: int) -> Iterator[torch.Tensor]:
        """The evaluation views: 1 (centre) or 10 (4 corners + centre, each with its flip)."""
        b, m, o = x.shape[0], self.size - self.crop, (self.size - self.crop) // 2
        offsets = [(o, o)] if n_crops == 1 else [(0, 0), (0, m), (m, 0), (m, m), (o, o)]
        flips = (False,) if n_crops == 1 else (False, True)
        x = x.to(self.device, non_blocking=True)
        for fl in flips:
            for oy, ox in offsets:
                yield self.crops(
                    x,
                    torch.full((b,), oy, dtype=torch.int64),
                    torch.full((b,), ox, dtype=torch.int64),
                    torch.full((b,), fl, dtype=torch.bool),
                )


def decode_batch(encoded: Any, size: int, device: torch.device) -> torch.Tensor:
    """Encoded image files (a list of byte tensors, or :func:`collate_encoded`'s flat form) →
    uint8 ``[b, 3, size, size]`` centre crops on ``device``: JPEGs are
    decoded together by ``torchvision.io.decode_jpeg(device=...)`` (nvJPEG on CUDA), others one
    by one on the CPU; each is resized (bilinear, antialiased) so its shorter side is ``size`` and
    centre-cropped with :class:`convlens.data.Preprocess`'s rounding. Results differ from the
    PIL path by interpolation round-off only."""
    import torchvision.io as tvio

    encoded = split_encoded(encoded)
    geom = _square_crop(size)
    is_jpeg = [
        len(e) > 3 and bool((e[:3] == torch.tensor([255, 216, 255], dtype=e.dtype)).all())
        for e in encoded
    ]
    images: list[torch.Tensor | None] = [None] * len(encoded)
    jpeg_idx = [i for i, j in enumerate(is_jpeg) if j]
    if jpeg_idx:
        decoded = tvio.decode_jpeg(
            [encoded[i] for i in jpeg_idx], mode=tvio.ImageReadMode.RGB, device=device
        )
        for i, img in zip(jpeg_idx, decoded, strict=True):
            images[i] = img
    for i, j in enumerate(is_jpeg):
        if not j:
            images[i] = tvio.decode_image(encoded[i], mode=tvio.ImageReadMode.RGB).to(device)
    out = torch.empty(len(encoded), 3, size, size, dtype=torch.uint8, device=device)
    for k, img in enumerate(images):
        assert img is not None
        h, w = int(img.shape[1]), int(img.shape[2])
        rw, rh = geom.resized_size(w, h)
        left, top, _, _ = geom.crop_box(w, h)
        r = F.interpolate(
            img[None].float(), size=(rh, rw), mode="bilinear", antialias=True, align_corners=False
        )
        out[k] = (
            r[0, :, top : top + size, left : left + size].round_().clamp_(0, 255).to(torch.uint8)
        )
    return out


# --------------------------------------------------------------------------------------------
# Everything together
# --------------------------------------------------------------------------------------------


@dataclass
class DataBundle:
    """What training and evaluation read: datasets of uint8 centre crops (or encoded files), the
    class names, the mean image and how the crops are produced (``source``)."""

    train: Dataset
    val: Dataset
    train_split: Split
    val_split: Split
    classes: list[str]
    mean_image: torch.Tensor
    size: int
    source: str  # "pack", "folder" (PIL in workers) or "device-decode"
    notes: list[str] = field(default_factory=list)

    @property
    def encoded(self) -> bool:
        return self.source == "device-decode"

    def loader(
        self, dataset: Dataset, batch_sampler: Sampler, workers: int, pin_memory: bool
    ) -> DataLoader:
        return DataLoader(
            dataset,
            batch_sampler=batch_sampler,
            num_workers=workers,
            pin_memory=pin_memory,
            collate_fn=collate_encoded if self.encoded else None,
            persistent_workers=False,
            prefetch_factor=4 if workers > 0 else None,
            # its own generator: creating an iterator must not draw from the global RNG (the
            # dropout stream a resumed run restores)
            generator=torch.Generator(),
        )

    def to_device_uint8(self, x: Any, device: torch.device) -> torch.Tensor:
        if self.encoded:
            return decode_batch(x, self.size, device)
        return x.to(device, non_blocking=True)


def resolve_workers(cfg: TrainConfig, dist: DistEnv) -> int:
    if cfg.workers >= 0:
        return cfg.workers
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(0, min(8, (cpus or 1) // max(1, dist.local_world_size) - 1))


def prepare_data(
    cfg: TrainConfig,
    dist: DistEnv,
    device: torch.device,
    log: Callable[[str], None] = lambda s: None,
    progress: Callable[[str, int], Any] | None = None,
) -> DataBundle:
    """Scan ``cfg.data`` (train/ and val/), pack it if asked (rank 0 packs, the others wait),
    load or compute the cached mean image, and choose how crops are produced."""
    if cfg.data is None:
        raise ConvlensError("prepare_data needs cfg.data (the miniature writes its folder first)")
    root = Path(cfg.data)
    train_split = scan_split(root, "train")
    val_split = scan_split(root, "val", train_split.classes)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    workers = resolve_workers(cfg, dist)
    notes: list[str] = []
    size = cfg.resize

    if cfg.pack:
        packs = {}
        for name, split in (("train", train_split), ("val", val_split)):
            pdir = (Path(cfg.pack_dir) if cfg.pack_dir else cache / "packed") / (
                f"{name}-{split.fingerprint(size)}"
            )
            if dist.is_main and not (pdir / "index.json").is_file():
                log(
                    f"packing {len(split)} {name} images into {pdir} "
                    f"({len(split) * bytes_per_image(size) / 1e9:.2f} GB)"
                )
                ctx = progress(f"pack {name}", len(split)) if progress else None
                if ctx is not None:
                    with ctx as advance:
                        pack(
                            split, pdir, size, workers, with_mean=name == "train", progress=advance
                        )
                else:
                    pack(split, pdir, size, workers, with_mean=name == "train")
            dist.barrier()
            packs[name] = PackedDataset(pdir)
            if packs[name].size != size or len(packs[name]) != len(split):
                raise ConvlensError(f"{pdir}: pack does not match the folder (re-pack it)")
        train_ds, val_ds, source = packs["train"], packs["val"], "pack"
        mean = torch.from_numpy(np.load(packs["train"].dir / "mean_image.npy"))
        notes.append(f"crops read from packs in {packs['train'].dir.parent}")
    else:
        decode = cfg.decode
        if decode == "auto":
            decode = "device" if device.type == "cuda" else "cpu"
        if decode == "device":
            source = "device-decode"
            if device.type != "cuda":
                warnings.warn(
                    "decode='device' without CUDA decodes on the CPU in the main process",
                    stacklevel=2,
                )
            train_ds, val_ds = EncodedDataset(train_split), EncodedDataset(val_split)
        else:
            source = "folder"
            train_ds, val_ds = FolderDataset(train_split, size), FolderDataset(val_split, size)
        mean_path = cache / f"mean-{train_split.fingerprint(size)}.npy"
        if mean_path.is_file():
            mean = torch.from_numpy(np.load(mean_path))
            notes.append(f"mean image from cache {mean_path}")
        else:
            log(f"computing the per-pixel mean image over {len(train_split)} training images")
            ctx = progress("mean image", len(train_split) // dist.world_size) if progress else None
            folder_ds = FolderDataset(train_split, size)
            if ctx is not None:
                with ctx as advance:
                    mean = compute_mean_image(folder_ds, size, dist, workers, progress=advance)
            else:
                mean = compute_mean_image(folder_ds, size, dist, workers)
            if dist.is_main:
                with atomic_path(mean_path) as tmp, open(tmp, "wb") as fh:
                    np.save(fh, mean.numpy())
            notes.append(f"mean image computed and cached at {mean_path}")
    if tuple(mean.shape) != (3, size, size):
        raise ConvlensError(
            f"mean image has shape {tuple(mean.shape)}, expected (3, {size}, {size})"
        )
    return DataBundle(
        train_ds, val_ds, train_split, val_split, train_split.classes, mean, size, source, notes
    )


def _main(argv: Sequence[str] | None = None) -> int:
    """``python -m convlens_zeiler_fergus.data pack ROOT --out DIR [--size 256] [--workers 8]``"""
    import argparse

    p = argparse.ArgumentParser(prog="python -m convlens_zeiler_fergus.data")
    sub = p.add_subparsers(dest="cmd", required=True)
    pk = sub.add_parser("pack", help="pack train/ and val/ into sharded uint8 memmaps")
    pk.add_argument("root")
    pk.add_argument("--out", required=True)
    pk.add_argument("--size", type=int, default=256)
    pk.add_argument("--workers", type=int, default=8)
    a = p.parse_args(argv)
    train = scan_split(a.root, "train")
    val = scan_split(a.root, "val", train.classes)
    for name, split in (("train", train), ("val", val)):
        dest = Path(a.out) / f"{name}-{split.fingerprint(a.size)}"
        print(
            f"{name}: {len(split)} images → {dest} ({len(split) * bytes_per_image(a.size) / 1e9:.1f} GB)"
        )
        pack(split, dest, a.size, a.workers, with_mean=name == "train")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_main())
