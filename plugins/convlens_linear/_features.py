"""Frozen features of chosen layers over an image set, cached on disk (Zeiler & Fergus 2014,
Sec. 5.2-5.3: "we keep layers 1-7 of our ImageNet-trained model fixed", Table 7 "features from
different layers").

Extraction runs the model once per batch with :func:`convlens.record` on every requested layer,
turns each activation into a vector (flattened, or pooled to a grid when the map is large: see
:func:`pool_features`), and writes the vectors shard by shard (``shard_size`` images per shard) as
``.npy`` files, each written to a temporary name and renamed. A shard file that exists is complete,
so an interrupted extraction resumes where it stopped, and a second run over the same images reads
the shards back memory-mapped (:class:`ShardedFeatures`) instead of running the model.

Each layer's shards live in their own folder, named by a hash of everything the vectors depend on:
the model (class, name, weights label and a hash of its state dict), the layer, the preprocessing,
the pooling, the dataset listing (paths, sizes, mtimes) and the shard size.

Under ``torchrun`` (a ``torch.distributed`` process group is initialised) rank ``r`` of ``w``
computes the shards ``s`` with ``s % w == r``, all ranks meet at a barrier, then every rank reads
the complete cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from convlens.data import Preprocess, SkippedImageWarning, load_image
from convlens.engine import record, resolve_layers, trace_model
from convlens.errors import ConvlensError
from convlens.io import atomic_path, write_json
from convlens_linear._classifiers import _threads
from convlens_linear._dataset import ImageFolder

__all__ = [
    "CACHE_VERSION",
    "POOL_MODES",
    "DEFAULT_MAX_DIM",
    "model_fingerprint",
    "candidate_layers",
    "default_layers",
    "pool_features",
    "ShardedFeatures",
    "LayerFeatures",
    "FeatureSet",
    "extract_features",
    "dist_info",
]

#: Bumped whenever the cache layout or what a shard holds changes.
CACHE_VERSION = 1
POOL_MODES = ("auto", "none", "avg", "max")
#: Flattened maps up to this many values are kept whole under ``pool="auto"``: zfnet's pool5
#: (256 x 6 x 6 = 9216, the paper's layer-5 features) is used as the paper used it.
DEFAULT_MAX_DIM = 9216

ProgressFactory = Callable[[str, int | None], Any]


# -- keys --------------------------------------------------------------------------------------


def model_fingerprint(model: nn.Module, name: str | None = None) -> dict[str, str]:
    """What identifies a model's features: its class, name, weights label and a BLAKE2b hash of
    every tensor of its state dict (names, dtypes, shapes and bytes), so retrained or edited
    weights never reuse stale features."""
    info = getattr(model, "convlens_info", None)
    h = hashlib.blake2b(digest_size=16)
    for key, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "name": name or str(getattr(info, "name", None) or type(model).__name__),
        "weights": str(getattr(info, "weights", None) or "unknown"),
        "state_hash": h.hexdigest(),
    }


def _hash(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:60] or "layer"


# -- which layers --------------------------------------------------------------------------------

_SKIP = ("Dropout", "Identity", "Flatten")


def _res(shape: tuple[int, ...] | None) -> tuple[int, ...] | str | None:
    if not shape:
        return None
    if len(shape) == 4:
        return (int(shape[2]), int(shape[3]))
    if len(shape) == 2:
        return "vector"
    return None


def candidate_layers(model: nn.Module, x: torch.Tensor | None = None) -> list[str]:
    """The layers ``--layers all`` means, in execution order.

    * A model with ``convlens_aliases`` (zfnet, alexnet): every ``conv*``/``pool*``/``fc*`` alias
      except the logits, i.e. the paper's layers 1-7 (Table 7).
    * Any other model: the end of every stage (the last module producing each spatial
      resolution, looking inside top-level containers that span several resolutions), then the
      pre-logits vector (the last vector-valued module before the output layer), found from one
      traced forward pass of ``x`` (zeros of the model's input size by default).
    """
    rec = trace_model(model, x)
    aliases = getattr(model, "convlens_aliases", {}) or {}
    if aliases:
        order = {}
        for c in rec.trace:
            order.setdefault(c.name, c.index)
        logits = aliases.get("logits")
        picked: dict[str, tuple[int, str]] = {}
        for alias, target in aliases.items():
            if not re.fullmatch(r"(conv|pool|fc)\d+", alias) or target == logits:
                continue
            if target in order and target not in picked:
                picked[target] = (order[target], alias)
        if picked:
            return [alias for _, alias in sorted(picked.values())]
    calls = [c for c in rec.trace if c.kind == "module"]
    kids: dict[str, list] = {}
    for c in calls:
        kids.setdefault(c.parent or "", []).append(c)

    def expand(seq: list) -> list:
        out = []
        for c in seq:
            inner = kids.get(c.name, [])
            # a container spanning several spatial resolutions: look at its stages
            if len({_res(k.output_shape) for k in inner} - {None, "vector"}) >= 2:
                out.extend(expand(inner))
            else:
                out.append(c)
        return out

    seq = [c for c in expand([c for c in calls if c.depth == 1]) if _res(c.output_shape)]
    if seq and _res(seq[-1].output_shape) == "vector":
        seq = seq[:-1]  # the output layer (logits)
    stages: list[str] = []
    for i, c in enumerate(seq):
        r = _res(c.output_shape)
        if r == "vector":
            continue
        nxt = _res(seq[i + 1].output_shape) if i + 1 < len(seq) else None
        if nxt != r:
            stages.append(c.name)
    last_map = max((i for i, c in enumerate(seq) if _res(c.output_shape) != "vector"), default=-1)
    vectors = [
        c.name
        for c in seq[last_map + 1 :]
        if _res(c.output_shape) == "vector" and not any(s in c.type for s in _SKIP)
    ]
    out = stages + vectors[-1:]
    if not out:
        raise ConvlensError(f"{type(model).__name__}: found no layer to probe; pass --layers")
    return out


def default_layers(
    model: nn.Module, max_layers: int = 4, x: torch.Tensor | None = None
) -> list[str]:
    """``max_layers`` layers spread evenly through :func:`candidate_layers` (first and last
    always included); all of them for a model with layer aliases (zfnet: conv1-5, pool5, fc6,
    fc7, as in the paper's Table 7)."""
    cands = candidate_layers(model, x)
    if getattr(model, "convlens_aliases", None) or len(cands) <= max_layers:
        return cands
    idx = np.unique(np.round(np.linspace(0, len(cands) - 1, max_layers)).astype(int))
    return [cands[i] for i in idx]


# -- activation -> vector ------------------------------------------------------------------------


def pool_features(
    a: torch.Tensor, pool: str = "auto", grid: int = 0, max_dim: int = DEFAULT_MAX_DIM
) -> tuple[torch.Tensor, dict[str, Any]]:
    """One vector per image from an activation ``[N, ...]``.

    For a map ``[N, C, H, W]``: ``none`` flattens it (the paper's choice); ``avg``/``max``
    pool it adaptively to a ``g x g`` grid (capped at ``H x W``) then flatten, with ``g = grid``
    or, for ``grid=0``, the largest ``g`` with ``C g^2 <= max_dim`` (at least 1; ``grid=1`` is
    global pooling); ``auto`` is ``none`` when ``C H W <= max_dim`` and ``avg`` otherwise. Other
    shapes are flattened. Returns the ``[N, D]`` vectors and what was done.
    """
    if pool not in POOL_MODES:
        raise ConvlensError(f"pool {pool!r}: expected one of {', '.join(POOL_MODES)}")
    if a.dim() != 4:
        v = a.reshape(a.shape[0], -1)
        return v, {"pool": "none", "grid": None, "dim": int(v.shape[1])}
    c, h, w = (int(s) for s in a.shape[1:])
    mode = pool
    if mode == "auto":
        mode = "none" if c * h * w <= max_dim else "avg"
    if mode == "none":
        v = a.flatten(1)
        return v, {"pool": "none", "grid": None, "dim": int(v.shape[1])}
    g = grid if grid > 0 else max(1, math.isqrt(max(1, max_dim // c)))
    size = (min(g, h), min(g, w))
    fn = F.adaptive_avg_pool2d if mode == "avg" else F.adaptive_max_pool2d
    v = fn(a, size).flatten(1)
    return v, {"pool": mode, "grid": list(size), "dim": int(v.shape[1])}


# -- memory-mapped shards ------------------------------------------------------------------------


class ShardedFeatures:
    """Rows of several memory-mapped ``.npy`` shards seen as one ``[N, D]`` array.

    ``feats[idx]`` (an index array) reads only those rows; ``np.asarray(feats)`` concatenates all.
    """

    def __init__(self, shards: Sequence[np.ndarray]) -> None:
        if not shards:
            raise ConvlensError("ShardedFeatures: no shards")
        self.shards = list(shards)
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])
        self.dim = int(self.shards[0].shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.offsets[-1]), self.dim)

    @property
    def dtype(self) -> np.dtype:
        return self.shards[0].dtype

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, idx: Any) -> np.ndarray:
        if isinstance(idx, slice):
            idx = np.arange(len(self))[idx]
        idx = np.asarray(idx, dtype=np.int64)
        scalar = idx.ndim == 0
        idx = idx.reshape(-1)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        idx = np.where(idx < 0, idx + len(self), idx)
        out = np.empty((idx.size, self.dim), dtype=self.dtype)
        which = np.searchsorted(self.offsets, idx, side="right") - 1
        for s in np.unique(which):
            sel = which == s
            out[sel] = self.shards[s][idx[sel] - self.offsets[s]]
        return out[0] if scalar else out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = np.concatenate([np.asarray(s) for s in self.shards])
        return a.astype(dtype) if dtype is not None else a


# -- results -----------------------------------------------------------------------------------


@dataclass
class LayerFeatures:
    """The features of one layer: ``data`` is ``[N, dim]`` float32 (NaN rows for images that
    could not be read), with how they were made and where they are cached."""

    layer: str
    key: str
    activation_shape: list[int]
    pool: str
    grid: list[int] | None
    dim: int
    path: Path
    from_cache: bool
    data: ShardedFeatures

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "module": self.key,
            "activation_shape": self.activation_shape,
            "pool": self.pool,
            "grid": self.grid,
            "dim": self.dim,
            "cache": str(self.path),
            "from_cache": self.from_cache,
        }


@dataclass
class FeatureSet:
    """What :func:`extract_features` returns."""

    dataset: ImageFolder
    layers: dict[str, LayerFeatures]
    valid: np.ndarray
    seconds: float
    computed_shards: list[int] = field(default_factory=list)
    n_shards: int = 0
    world_size: int = 1
    rank: int = 0

    def __getitem__(self, layer: str) -> ShardedFeatures:
        return self.layers[layer].data

    @property
    def skipped(self) -> list[str]:
        rel = self.dataset.relative_paths()
        return [rel[i] for i in np.flatnonzero(~self.valid)]

    @property
    def from_cache(self) -> bool:
        return not self.computed_shards


# -- distributed ---------------------------------------------------------------------------------


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised ``torch.distributed`` group, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# -- extraction --------------------------------------------------------------------------------


class _Images(torch.utils.data.Dataset):
    """Preprocessed images by index; an unreadable file gives zeros and ``ok=False``."""

    def __init__(self, paths: Sequence[Path], preprocess: Preprocess) -> None:
        self.paths = list(paths)
        self.pre = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, bool, str]:
        try:
            return self.pre(load_image(self.paths[i])), True, ""
        except ConvlensError as exc:
            h, w = self.pre.input_size
            return torch.zeros(3, h, w), False, str(exc)


def _batches(
    ds: _Images, rows: range, batch_size: int, workers: int
) -> Iterator[tuple[torch.Tensor, list[bool], list[str]]]:
    sub = torch.utils.data.Subset(ds, list(rows))
    if workers <= 0:
        for start in range(0, len(sub), batch_size):
            # decoding and normalising one image is a few small tensor ops: threads only add
            # synchronisation (10x slower on a busy machine)
            with _threads(1):
                items = [sub[i] for i in range(start, min(start + batch_size, len(sub)))]
            yield (
                torch.stack([t for t, _, _ in items]),
                [o for _, o, _ in items],
                [m for _, _, m in items],
            )
        return
    loader = torch.utils.data.DataLoader(
        sub,
        batch_size=batch_size,
        num_workers=workers,
        shuffle=False,
        collate_fn=lambda items: (
            torch.stack([t for t, _, _ in items]),
            [o for _, o, _ in items],
            [m for _, _, m in items],
        ),
    )
    yield from loader


def _shard_path(folder: Path, s: int) -> Path:
    return folder / f"shard-{s:05d}.npy"


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)


def extract_features(
    model: nn.Module,
    dataset: ImageFolder,
    layers: Sequence[str],
    preprocess: Preprocess | None = None,
    *,
    cache_dir: str | os.PathLike,
    pool: str = "auto",
    grid: int = 0,
    max_dim: int = DEFAULT_MAX_DIM,
    batch_size: int = 32,
    shard_size: int = 256,
    workers: int = 0,
    device: torch.device | str | None = None,
    model_name: str | None = None,
    progress: ProgressFactory | None = None,
    on_shard: Callable[[int], None] | None = None,
) -> FeatureSet:
    """Features of ``layers`` for every image of ``dataset``, from the cache where present.

    ``cache_dir`` holds one folder per layer (see the module docstring for the key);
    ``shard_size`` images make one shard, the unit of caching, resuming and of the work split
    across ``torchrun`` ranks; ``batch_size`` images go through the model at once; ``workers`` >
    0 loads images in that many processes. ``on_shard(s)`` is called after shard ``s`` is
    written (a test hook: raising there interrupts the extraction). ``progress`` is a
    ``ctx.progress``-style factory.

    Raises:
        ConvlensError: an unknown layer, a bad pooling mode, a layer that did not run, or shards
            missing after the ranks finished.
    """
    t0 = time.perf_counter()
    if not layers:
        raise ConvlensError("extract_features: no layers given")
    if batch_size < 1 or shard_size < 1:
        raise ConvlensError("extract_features: batch_size and shard_size must be positive")
    if pool not in POOL_MODES:
        raise ConvlensError(f"pool {pool!r}: expected one of {', '.join(POOL_MODES)}")
    pre = preprocess or Preprocess.for_model(model)
    refs = resolve_layers(model, list(layers))
    if device is None:
        try:
            device = next(model.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
    device = torch.device(device)
    rank, world = dist_info()
    n = len(dataset)
    n_shards = max(1, math.ceil(n / shard_size))
    base = {
        "cache_version": CACHE_VERSION,
        "model": model_fingerprint(model, model_name),
        "preprocess": pre.to_dict(),
        "dataset": dataset.fingerprint(),
        "n_images": n,
        "shard_size": shard_size,
        "pool": {"mode": pool, "grid": grid, "max_dim": max_dim},
    }
    root = Path(cache_dir)
    folders = {}
    for layer, ref in zip(layers, refs, strict=True):
        key = {**base, "layer": ref.key}
        folders[layer] = root / f"{_slug(base['model']['name'])}" / f"{_slug(ref.key)}-{_hash(key)}"
    missing = {
        s: [la for la in layers if not _shard_path(folders[la], s).exists()]
        for s in range(n_shards)
    }
    todo = [s for s in range(n_shards) if missing[s] and s % world == rank]
    computed: list[int] = []
    if todo:
        computed = _compute(
            model,
            dataset,
            list(layers),
            refs,
            pre,
            folders,
            missing,
            todo,
            base,
            pool=pool,
            grid=grid,
            max_dim=max_dim,
            batch_size=batch_size,
            shard_size=shard_size,
            workers=workers,
            device=device,
            progress=progress,
            on_shard=on_shard,
        )
    _barrier()
    out: dict[str, LayerFeatures] = {}
    for layer, ref in zip(layers, refs, strict=True):
        folder = folders[layer]
        gone = [s for s in range(n_shards) if not _shard_path(folder, s).exists()]
        if gone:
            raise ConvlensError(
                f"{folder}: shard(s) {gone[:5]} of layer {layer!r} missing after extraction "
                f"(did another rank fail?)"
            )
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        shards = [np.load(_shard_path(folder, s), mmap_mode="r") for s in range(n_shards)]
        out[layer] = LayerFeatures(
            layer=layer,
            key=ref.key,
            activation_shape=meta["activation_shape"],
            pool=meta["resolved"]["pool"],
            grid=meta["resolved"]["grid"],
            dim=meta["resolved"]["dim"],
            path=folder,
            from_cache=not any(layer in missing[s] for s in range(n_shards)),
            data=ShardedFeatures(shards),
        )
    first = out[layers[0]].data
    valid = np.concatenate([~np.isnan(np.asarray(s[:, 0])) for s in first.shards])
    return FeatureSet(
        dataset=dataset,
        layers=out,
        valid=valid,
        seconds=time.perf_counter() - t0,
        computed_shards=computed,
        n_shards=n_shards,
        world_size=world,
        rank=rank,
    )


def _compute(
    model: nn.Module,
    dataset: ImageFolder,
    layers: list[str],
    refs: list,
    pre: Preprocess,
    folders: dict[str, Path],
    missing: dict[int, list[str]],
    todo: list[int],
    base: dict[str, Any],
    *,
    pool: str,
    grid: int,
    max_dim: int,
    batch_size: int,
    shard_size: int,
    workers: int,
    device: torch.device,
    progress: ProgressFactory | None,
    on_shard: Callable[[int], None] | None,
) -> list[int]:
    n = len(dataset)
    ds = _Images(dataset.paths, pre)
    functional = any(r.is_function for r in refs)
    keys = {la: r.key for la, r in zip(layers, refs, strict=True)}
    total = sum(min(n, (s + 1) * shard_size) - s * shard_size for s in todo)
    bar = progress("extracting features", total) if progress else contextlib.nullcontext(None)
    computed: list[int] = []
    was_training = model.training
    model.eval()
    try:
        with (
            bar as advance,
            torch.inference_mode(),
            record(model, list(layers), switches=False, trace=False, functional=functional) as rec,
        ):
            for s in todo:
                rows = range(s * shard_size, min(n, (s + 1) * shard_size))
                parts: dict[str, list[np.ndarray]] = {la: [] for la in missing[s]}
                oks: list[bool] = []
                info: dict[str, tuple[list[int], dict[str, Any]]] = {}
                for x, ok, msgs in _batches(ds, rows, batch_size, workers):
                    model(x.to(device))
                    for la in missing[s]:
                        act = rec[la]
                        v, how = pool_features(act, pool, grid, max_dim)
                        info[la] = (list(act.shape[1:]), how)
                        parts[la].append(v.float().cpu().numpy())
                    oks.extend(ok)
                    for m in msgs:
                        if m:
                            warnings.warn(f"{m}: skipped", SkippedImageWarning, stacklevel=2)
                    if advance:
                        advance(len(ok))
                bad = ~np.asarray(oks, dtype=bool)
                for la in missing[s]:
                    feats = np.concatenate(parts[la]).astype(np.float32, copy=False)
                    feats[bad] = np.nan
                    folder = folders[la]
                    if not (folder / "meta.json").exists():
                        shape, how = info[la]
                        write_json(
                            folder / "meta.json",
                            {
                                **base,
                                "layer": la,
                                "module": keys[la],
                                "activation_shape": shape,
                                "resolved": how,
                            },
                        )
                    _save_npy(_shard_path(folder, s), feats)
                computed.append(s)
                if on_shard is not None:
                    on_shard(s)
    finally:
        model.train(was_training)
    return computed
