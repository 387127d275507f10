"""Top-k mining: the strongest activations of chosen channels across a set of images (Fig. 2).

Section 4: "for layers 2–5 we show the top 9 activations in a random subset of feature maps across
the validation data". :func:`mine_topk` streams over the images once, in batches, keeping for each
chosen channel only its ``k`` best (value, image, y, x) so far — memory is ``k × channels``
entries, whatever the number of images (the images are read one by one and dropped).

Each image contributes at most ``per_image`` positions per channel (default 1: its strongest), so
the top 9 come from 9 different images, as in the paper's figure.

Order is total and deterministic: value descending, then image index, then position ascending;
streaming, batching and the distributed merge all give the same result.

**Across machines.** Under ``torchrun`` (``torch.distributed`` initialised), rank ``r`` of ``W``
mines images ``r, r+W, r+2W, …`` of the common file list and the per-channel top-k are merged with
``all_gather`` — every rank ends with the global result, equal to a single-process run.

**For the atlas** (``convlens atlas``), the same pass can also read an
:class:`~convlens.data.ImageDataset` (folders and ``.tar`` shards, streamed), keep a running
:class:`~convlens_deconv._summary.UnitSummary` of every unit (``summaries=True``: mean, activation
rate, a quantile sketch; merged across ranks like the top-k) and write a checkpoint every
``checkpoint_every`` images (``checkpoint=PATH``): the state after a whole batch — top-k,
summaries, how far this rank's share of the stream has been read — so a killed run started again
with the same arguments continues from there and ends with exactly the result of an uninterrupted
run (same batches, same order of operations).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convlens.data import ImageDataset, Preprocess, SkippedImageWarning, find_images, load_image
from convlens.errors import ConvlensError, ImageError
from convlens_deconv._forward import recorded_forward
from convlens_deconv._summary import BINS, UnitSummary

__all__ = [
    "TopK",
    "mine_topk",
    "mine_topk_layers",
    "merge_topk",
    "image_batches",
    "distributed_info",
    "init_distributed",
]


@dataclass
class TopK:
    """Per-channel top-k activations. ``values``/``image``/``y``/``x`` are ``[C, k]`` (row ``i``
    belongs to ``channels[i]``), best first; unused slots have value ``-inf`` and image ``-1``;
    ``y = x = -1`` for a layer without spatial layout. ``image`` indexes ``files`` (the common
    ordered file list) or the rows of an input tensor."""

    layer: str
    channels: list[int]
    k: int
    values: torch.Tensor
    image: torch.Tensor
    y: torch.Tensor
    x: torch.Tensor
    n_images: int = 0
    files: list[Path] | None = None
    world_size: int = 1
    map_shape: tuple[int, ...] = ()
    #: running summary of every channel's activations (``summaries=True``), rows as ``channels``
    summary: UnitSummary | None = None

    def entries(self) -> list[dict[str, Any]]:
        """Every filled slot as ``{channel, rank, image, y, x, value}`` (channel-major)."""
        out = []
        for row, ch in enumerate(self.channels):
            for r in range(self.k):
                img = int(self.image[row, r])
                if img < 0:
                    continue
                out.append(
                    {
                        "channel": ch,
                        "rank": r,
                        "image": img,
                        "y": int(self.y[row, r]),
                        "x": int(self.x[row, r]),
                        "value": float(self.values[row, r]),
                    }
                )
        return out

    def path(self, image: int) -> Path | None:
        return (
            self.files[image] if self.files is not None and 0 <= image < len(self.files) else None
        )


def distributed_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised ``torch.distributed`` group, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(
    device: torch.device, model: nn.Module | None = None
) -> tuple[bool, torch.device]:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1): join the process group (gloo on CPU, nccl on
    CUDA, each rank on GPU ``LOCAL_RANK``, the model moved there). Returns ``(created, device)``:
    whether this call created the group (then the caller destroys it), and the rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return False, device
    import torch.distributed as dist

    if dist.is_initialized():
        return False, device
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        if model is not None:
            model.to(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True, device


def _order(values: torch.Tensor, key2: torch.Tensor) -> torch.Tensor:
    """Per row: indices sorting by value descending, then ``key2`` ascending (stable)."""
    o2 = torch.sort(key2, dim=1, stable=True).indices
    v = torch.gather(values, 1, o2)
    o1 = torch.sort(v, dim=1, descending=True, stable=True).indices
    return torch.gather(o2, 1, o1)


def merge_topk(parts: Sequence[tuple[torch.Tensor, ...]], k: int, positions: int) -> tuple:
    """Merge candidate sets ``(values, image, y, x)`` (each ``[C, n_i]``) into the top ``k`` per
    row, in the deterministic order (value desc, image asc, position asc)."""
    values = torch.cat([p[0] for p in parts], 1)
    image = torch.cat([p[1] for p in parts], 1)
    ys = torch.cat([p[2] for p in parts], 1)
    xs = torch.cat([p[3] for p in parts], 1)
    empty = image < 0
    values = values.masked_fill(empty | values.isnan(), float("-inf"))
    big = torch.iinfo(torch.long).max // 4
    pos = ys.clamp(min=0) * max(positions, 1) + xs.clamp(min=0)
    key2 = torch.where(empty, torch.full_like(image, big), image * max(positions, 1) ** 2 + pos)
    order = _order(values, key2)[:, :k]
    out = [torch.gather(t, 1, order) for t in (values, image, ys, xs)]
    if out[0].shape[1] < k:  # fewer candidates than k: pad
        pad = k - out[0].shape[1]
        c = values.shape[0]
        out[0] = torch.cat([out[0], torch.full((c, pad), float("-inf"), dtype=values.dtype)], 1)
        for i in (1, 2, 3):
            out[i] = torch.cat([out[i], torch.full((c, pad), -1, dtype=torch.long)], 1)
    return tuple(out)


def image_batches(
    images: Any,
    preprocess: Preprocess,
    batch_size: int,
    rank: int = 0,
    world: int = 1,
) -> tuple[Iterator[tuple[torch.Tensor, list[int]]], list[Path] | None, int]:
    """``(batches, files, total)``: an iterator of ``(inputs [B, 3, H, W], global indices)`` over
    this rank's shard, the ordered file list (None for a tensor) and the number of candidates.

    ``images``: a ``[N, 3, H, W]`` tensor (already preprocessed), files/folders, or an
    :class:`~convlens.data.ImageDataset` (folders and ``.tar`` shards, streamed). Files found in a
    folder or shard that cannot be read are skipped with a
    :class:`~convlens.data.SkippedImageWarning`; a file named explicitly that cannot be read
    raises."""
    batches, files, total = _positioned_batches(images, preprocess, batch_size, rank, world)
    return ((x, ids) for x, ids, _ in batches), files, total


def _positioned_batches(
    images: Any, preprocess: Preprocess, batch_size: int, rank: int, world: int, start: int = 0
) -> tuple[Iterator[tuple[torch.Tensor, list[int], int]], list[Path] | None, int]:
    """:func:`image_batches` whose batches also say how many of this rank's candidates have been
    read after them (where a resumed run starts: ``start``)."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ConvlensError(f"images: expected [N, C, H, W], got {tuple(images.shape)}")
        idx = list(range(rank, images.shape[0], world))

        def tensor_batches() -> Iterator[tuple[torch.Tensor, list[int], int]]:
            for i in range(start, len(idx), batch_size):
                part = idx[i : i + batch_size]
                yield images[part], part, i + len(part)

        return tensor_batches(), None, int(images.shape[0])
    if isinstance(images, ImageDataset):
        dataset = images
        mine = range(rank, len(dataset), world)

        def dataset_batches() -> Iterator[tuple[torch.Tensor, list[int], int]]:
            buf: list[torch.Tensor] = []
            ids: list[int] = []
            for i, img in dataset.iter_images(mine[start:]):
                buf.append(preprocess(img))
                ids.append(i)
                del img
                if len(buf) == batch_size:
                    yield torch.stack(buf), ids, (i - rank) // world + 1
                    buf, ids = [], []
            if buf:
                yield torch.stack(buf), ids, len(mine)

        return dataset_batches(), [Path(n) for n in dataset.names], len(dataset)
    paths = [Path(images)] if isinstance(images, (str, Path)) else [Path(p) for p in images]
    files = find_images(paths)
    explicit = {p for p in paths if not p.is_dir()}
    mine = list(range(rank, len(files), world))

    def file_batches() -> Iterator[tuple[torch.Tensor, list[int], int]]:
        buf: list[torch.Tensor] = []
        ids: list[int] = []
        for pos in range(start, len(mine)):
            i = mine[pos]
            f = files[i]
            try:
                img = load_image(f)
            except ImageError as exc:
                if f in explicit:
                    raise
                reason = str(exc).removeprefix(f"{f}: ")
                warnings.warn(f"{f}: skipped: {reason}", SkippedImageWarning, stacklevel=2)
                continue
            buf.append(preprocess(img))
            ids.append(i)
            del img
            if len(buf) == batch_size:
                yield torch.stack(buf), ids, pos + 1
                buf, ids = [], []
        if buf:
            yield torch.stack(buf), ids, len(mine)

    return file_batches(), files, len(files)


def mine_topk(
    model: nn.Module,
    layer: str,
    images: Any,
    *,
    channels: Sequence[int] | None = None,
    k: int = 9,
    per_image: int = 1,
    preprocess: Preprocess | None = None,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    progress: Callable[[int], None] | None = None,
    distributed: bool | None = None,
) -> TopK:
    """Stream over ``images`` once and keep, for each of ``channels`` (all when None) of
    ``layer``, its ``k`` strongest activations (at most ``per_image`` per image).

    ``images``: files/folders (streamed, read one at a time) or a preprocessed ``[N, 3, H, W]``
    tensor. ``distributed``: None = use ``torch.distributed`` when it is initialised (shard the
    images over ranks and merge), False = ignore it. ``progress(n)`` is called per batch."""
    return mine_topk_layers(
        model,
        [layer],
        images,
        channels={layer: channels},
        k=k,
        per_image=per_image,
        preprocess=preprocess,
        batch_size=batch_size,
        device=device,
        progress=progress,
        distributed=distributed,
        stop_at=layer,
    )[layer]


def mine_topk_layers(
    model: nn.Module,
    layers: Sequence[str],
    images: Any,
    *,
    channels: dict[str, Sequence[int] | None] | None = None,
    k: int = 9,
    per_image: int = 1,
    preprocess: Preprocess | None = None,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    progress: Callable[[int], None] | None = None,
    distributed: bool | None = None,
    stop_at: str | None = None,
    summaries: bool = False,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    checkpoint_key: dict[str, Any] | None = None,
    on_resume: Callable[[int], None] | None = None,
) -> dict[str, TopK]:
    """:func:`mine_topk` for several layers in **one** pass over the images (one forward pass per
    batch records them all, stopped after ``stop_at``, the deepest of them, when given).
    ``channels[layer]``: that layer's channels (None or missing: all).

    ``summaries``: also keep each channel's :class:`~convlens_deconv._summary.UnitSummary`
    (``TopK.summary``). ``checkpoint``: this rank's checkpoint file, written every
    ``checkpoint_every`` images (at the end of the batch that reaches each multiple) and read at
    the start when it exists and was written with the same arguments and ``checkpoint_key`` (the
    caller's description of the model and data); then the pass continues where it stopped and
    ``on_resume(n)`` is told how many images were already done. The caller removes the file when
    it no longer needs it."""
    if k < 1 or per_image < 1:
        raise ConvlensError(f"top-k mining: k and per_image must be >= 1 (got {k}, {per_image})")
    layers = list(dict.fromkeys(layers))
    if not layers:
        raise ConvlensError("top-k mining: no layers given")
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    pre = preprocess or Preprocess.for_model(model)
    rank, world = distributed_info() if distributed in (None, True) else (0, 1)
    wanted = channels or {}
    chans: dict[str, list[int] | None] = {
        lay: (list(wanted[lay]) if wanted.get(lay) is not None else None) for lay in layers
    }
    best: dict[str, tuple | None] = dict.fromkeys(layers)
    positions = dict.fromkeys(layers, 1)
    map_shape: dict[str, tuple[int, ...]] = dict.fromkeys(layers, ())
    stats: dict[str, UnitSummary | None] = dict.fromkeys(layers)
    seen = 0
    start = 0
    ckpt = _Checkpoint(checkpoint, checkpoint_every, {
        "key": checkpoint_key or {}, "layers": layers, "channels": chans, "k": k,
        "per_image": per_image, "batch_size": batch_size, "rank": rank, "world": world,
        "summaries": summaries, "bins": BINS, "input": pre.to_dict(),
    }) if checkpoint is not None else None  # fmt: skip
    if ckpt is not None:
        state = ckpt.load()
        if state is not None:
            start, seen = state["position"], state["seen"]
            chans, positions, map_shape = state["chans"], state["positions"], state["map_shape"]
            best = {lay: (tuple(b) if b is not None else None) for lay, b in state["best"].items()}
            for lay, st in state["stats"].items():
                if st is not None:
                    stats[lay] = UnitSummary(len(st["sum"]))
                    stats[lay].load_state_dict(st)
            if on_resume is not None:
                on_resume(seen)
    batches, files, total = _positioned_batches(images, pre, batch_size, rank, world, start)
    was_training = model.training
    model.eval()
    try:
        for xb, ids, pos in batches:
            with torch.inference_mode():
                rec = recorded_forward(
                    model, xb.to(device), layers, stop_at, switches=False, trace=False
                )
            for layer in layers:
                act = rec[layer]
                if act.dim() not in (2, 4):
                    raise ConvlensError(
                        f"layer {layer!r}: output of shape {tuple(act.shape)} cannot be mined"
                    )
                if chans[layer] is None:
                    chans[layer] = list(range(act.shape[1]))
                bad = [c for c in chans[layer] if not 0 <= c < act.shape[1]]
                if bad:
                    raise ConvlensError(
                        f"channel {bad[0]}: layer {layer!r} has {act.shape[1]} channels"
                    )
                map_shape[layer] = tuple(act.shape[1:])
                sub = act if len(chans[layer]) == act.shape[1] and chans[layer] == list(
                    range(act.shape[1])) else act[:, chans[layer]]  # fmt: skip
                cand = _candidates(sub, ids, per_image)
                positions[layer] = _positions(act)
                prev = best[layer]
                best[layer] = merge_topk(
                    [prev, cand] if prev is not None else [cand], k, positions[layer]
                )
                if summaries:
                    if stats[layer] is None:
                        stats[layer] = UnitSummary(len(chans[layer]))
                    # with one candidate per image, the candidates are each image's maxima
                    maxes = cand[0].T if per_image == 1 and sub.dim() == 4 else None
                    stats[layer].update(sub, maxes)
            seen += len(ids)
            if ckpt is not None:
                ckpt.maybe_save(seen, lambda pos=pos, seen=seen: {
                    "position": pos, "seen": seen, "chans": chans, "positions": positions,
                    "map_shape": map_shape, "best": best,
                    "stats": {lay: (st.state_dict() if st is not None else None)
                              for lay, st in stats.items()},
                })  # fmt: skip
            if progress is not None:
                progress(len(ids))
    finally:
        model.train(was_training)
    out: dict[str, TopK] = {}
    n_seen = seen
    for layer in layers:
        ch, pos, shape, b = chans[layer], positions[layer], map_shape[layer], best[layer]
        if world > 1:  # every rank must agree on the channels and the map before merging
            ch, pos, shape = _agree(ch, pos, shape)
        if ch is None:
            raise ConvlensError("top-k mining: no images")
        if b is None:  # nothing on this rank (more ranks than images)
            c = len(ch)
            b = (
                torch.full((c, k), float("-inf")),
                *(torch.full((c, k), -1, dtype=torch.long) for _ in range(3)),
            )
        st = stats[layer]
        if summaries and st is None:
            st = UnitSummary(len(ch))
        if world > 1:
            b, n_seen = _all_gather_merge(b, k, seen, pos)
            if st is not None:
                st = _all_gather_summaries(st)
        out[layer] = TopK(
            layer,
            ch,
            k,
            b[0],
            b[1],
            b[2],
            b[3],
            n_images=n_seen,
            files=files,
            world_size=world,
            map_shape=shape,
            summary=st,
        )
    return out


class _Checkpoint:
    """One rank's pass-1 checkpoint: ``torch.save`` of plain tensors and lists, written through a
    temporary file and renamed (a kill leaves the previous checkpoint or the new one, never half
    of one), read with ``weights_only=True``; ``meta`` must match for it to be used."""

    def __init__(self, path: str | os.PathLike, every: int, meta: dict[str, Any]) -> None:
        self.path = Path(path)
        self.every = max(int(every), 0)
        self.meta = _plain(meta)
        self.last = 0

    def load(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - an unreadable checkpoint: start afresh
            warnings.warn(f"{self.path}: checkpoint unreadable, starting again ({exc})",
                          stacklevel=3)  # fmt: skip
            return None
        if state.get("meta") != self.meta:
            warnings.warn(f"{self.path}: checkpoint of a different run (model, data or options "
                          "changed), starting again", stacklevel=3)  # fmt: skip
            return None
        self.last = int(state["state"]["seen"])
        return state["state"]

    def maybe_save(self, seen: int, state: Callable[[], dict[str, Any]]) -> None:
        if not self.every or seen // self.every == self.last // self.every:
            return
        from convlens.io import atomic_path

        with atomic_path(self.path) as tmp:
            torch.save({"meta": self.meta, "state": state()}, tmp)
        self.last = seen


def _plain(obj: Any) -> Any:
    """JSON-like copy (lists, not tuples) so a loaded checkpoint's meta compares equal."""
    import json

    return json.loads(json.dumps(obj, default=str))


def _positions(act: torch.Tensor) -> int:
    return int(max(act.shape[-2:])) if act.dim() == 4 else 1


def _candidates(act: torch.Tensor, ids: list[int], per_image: int) -> tuple:
    """Each image's best ``per_image`` positions per channel of ``act`` (already restricted to
    the chosen channels), as ``[C, B·p]`` tensors (CPU)."""
    a = act.float()
    b, nc = a.shape[0], a.shape[1]
    if a.dim() == 4:
        w = a.shape[-1]
        flat = a.flatten(2)
        p = min(per_image, flat.shape[-1])
        if p == 1:
            v, pos = flat.max(-1, keepdim=True)
        else:
            v, pos = flat.topk(p, -1)
        ys, xs = torch.div(pos, w, rounding_mode="floor"), pos % w
    else:
        p = 1
        v = a[..., None]
        ys = xs = torch.full_like(v, -1, dtype=torch.long)
    img = torch.tensor(ids, dtype=torch.long, device=v.device)[:, None, None].expand(b, nc, p)

    def cm(t: torch.Tensor) -> torch.Tensor:  # [B, C, p] -> [C, B*p]
        return t.permute(1, 0, 2).reshape(nc, b * p).cpu()

    return cm(v), cm(img), cm(ys), cm(xs)


def _agree(chans: list[int] | None, positions: int, map_shape: tuple[int, ...]):
    """Ranks that saw no image learn the channel list, positions and map shape from the others."""
    import torch.distributed as dist

    objs: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(objs, (chans, positions, map_shape))
    for c, _p, m in objs:
        if c is not None:
            return (chans if chans is not None else c), max(o[1] for o in objs), m
    return None, positions, map_shape


def _all_gather_merge(best: tuple, k: int, seen: int, positions: int) -> tuple:
    import torch.distributed as dist

    dev = torch.device("cpu")
    if dist.get_backend() == "nccl":
        dev = torch.device("cuda", torch.cuda.current_device())
    world = dist.get_world_size()
    gathered = []
    for t in best:
        t = t.to(dev).contiguous()
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t)
        gathered.append([p.cpu() for p in parts])
    count = torch.tensor([seen], dtype=torch.long, device=dev)
    dist.all_reduce(count)
    parts = [tuple(g[r] for g in gathered) for r in range(world)]
    return merge_topk(parts, k, positions), int(count.item())


def _all_gather_summaries(st: UnitSummary) -> UnitSummary:
    """Every rank's summaries merged (in rank order) on every rank."""
    import torch.distributed as dist

    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, st.state_dict())
    merged = UnitSummary(st.units)
    for part in parts:
        one = UnitSummary(st.units)
        one.load_state_dict(part)
        merged.merge(one)
    return merged
