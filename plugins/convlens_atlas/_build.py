"""``build_atlas``: the two passes and the files (see the package docstring and ``docs/atlas.md``).

Pass 1 is the deconv probe's streaming miner (:func:`convlens_deconv.mine_topk_layers`) with
``summaries=True`` and a checkpoint; pass 2 projects every unit's top-k with the deconv probe's
:func:`~convlens_deconv.project` (rule per layer from :func:`~convlens_deconv.choose_rule`), cuts
the crops with :mod:`convlens.render.crops` and draws Fig. 2 with
:func:`convlens_deconv._render.fig2_canvas`; :mod:`convlens_atlas._site` writes the pages.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from convlens_deconv._mining import distributed_info, init_distributed, mine_topk_layers
from convlens_deconv._probe import check_map_layers
from convlens_deconv._project import Seed, project
from convlens_deconv._render import BACKGROUND, UnitTiles, fig2_canvas, resize
from convlens_deconv._specificity import SPECIFICITY_THRESHOLD, choose_rule
from convlens_deconv._summary import BINS, QUANTILES
from PIL import Image
from torch import nn

from convlens.data import ImageDataset, Preprocess, open_dataset
from convlens.engine import depth_layers, resolve_layer, trace_model, unsaturated
from convlens.errors import ConvlensError
from convlens.io import atomic_path, write_json
from convlens.options import parse_int_list, parse_str_list
from convlens.render import robust_stretch
from convlens.render.crops import crop_side, cut, is_local, mass_side, unit_box, unit_center

__all__ = ["build_atlas", "AtlasResult", "resolve_units", "SCHEMA", "CHECKPOINT_DIR"]

#: Version of atlas.json / layer.json.
SCHEMA = 1
#: Where pass-1 checkpoints live, inside ``--out`` (outside the staged ``atlas/`` folder).
CHECKPOINT_DIR = ".atlas-resume"
#: Images read per step of pass 2 (all layers' seeds in those images are projected together).
CHUNK_IMAGES = 64
#: Side of a Fig. 2 tile and of the thumbnails, in pixels.
TILE = 72
#: Photos the ``auto`` rule measures image_specificity on.
REFERENCE_IMAGES = 4


@dataclass
class AtlasResult:
    """What :func:`build_atlas` wrote (rank 0) and how long each part took."""

    out_dir: Path
    doc: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    resumed_from: int = 0
    files: list[Path] = field(default_factory=list)


def resolve_units(text: str | Sequence[int] | None) -> list[int] | None:
    """``--units``: ``all`` (None) or ``0-63,100``; negative numbers are an error."""
    units = parse_int_list(text, "--units")
    if units is None:
        return None
    if not units:
        raise ConvlensError(f"--units {text!r}: no unit selected")
    bad = [u for u in units if u < 0]
    if bad:
        raise ConvlensError(f"--units {text!r}: unit {bad[0]} is negative")
    return sorted(set(units))


def _choose_layers(model: nn.Module, rec, requested: list[str], note) -> list[str]:
    if not requested:
        return [lay for lay, _ in depth_layers(model, rec=rec)]
    layers = []
    for lay in requested:
        resolve_layer(model, lay)  # a misspelt layer fails here, naming it
        sub = unsaturated(rec, lay)
        if sub != lay:
            note(f"atlas {lay}: ends in a rectifier with a ceiling (ReLU6): mining and "
                 f"projecting its input {sub} instead")  # fmt: skip
        layers.append(sub)
    layers = list(dict.fromkeys(layers))
    check_map_layers(rec, layers, "the atlas shows")
    order = {lay: rec.layer(lay).index for lay in layers}
    return sorted(layers, key=lambda lay: order[lay])


def _units_per_layer(rec, layers: list[str], units: list[int] | None, note) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for lay in layers:
        n = int(rec.layer(lay).output_shape[1])
        if units is None:
            out[lay] = list(range(n))
            continue
        have = [u for u in units if u < n]
        if not have:
            raise ConvlensError(
                f"--units {units[0]}-{units[-1]}: layer {lay!r} has only {n} units (0-{n - 1})"
            )
        if len(have) < len(units):
            note(f"atlas {lay}: has {n} units; units {n}-{units[-1]} left out there")
        out[lay] = have
    return out


def _safe(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "layer"


def _display(dataset: ImageDataset, index: int, roots: list[Path]) -> str:
    """A short name for an image: its path below the dataset folder it was found in, or
    ``shard.tar:member``."""
    it = dataset.items[index]
    if it.member is not None:
        return f"{it.path.name}:{it.member}"
    for r in roots:
        with contextlib.suppress(ValueError):
            if r.is_dir():
                return it.path.relative_to(r).as_posix()
    return it.path.name


def build_atlas(
    model: nn.Module,
    out_dir: Path,
    *,
    model_name: str,
    images: ImageDataset | Sequence[str | Path] | None = None,
    layers: str | Sequence[str] | None = None,
    units: str | Sequence[int] | None = None,
    k: int = 9,
    rule: str = "auto",
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    checkpoint_root: Path | None = None,
    checkpoint_every: int = 1000,
    resume: bool = True,
    progress: Callable[..., Any] | None = None,
    note: Callable[[str], None] | None = None,
    preprocess: Preprocess | None = None,
    key: dict[str, Any] | None = None,
) -> AtlasResult | None:
    """Build the atlas of ``model`` into ``out_dir`` (a fresh folder; the CLI stages it).

    ``images``: the DATASET (folders, files, ``.tar`` shards, brace patterns, or an opened
    :class:`~convlens.data.ImageDataset`), None = the embedded mining set. ``layers``: names (default: :func:`~convlens.engine.depth_layers`).
    ``units``: ``all``/None or ``0-63``. ``checkpoint_root``: where pass 1 checkpoints every
    ``checkpoint_every`` images (None: no checkpoint); with ``resume`` a matching checkpoint is
    continued. ``key``: what identifies the model for the checkpoint (name, weights). Under
    ``torchrun`` every rank mines its share; only rank 0 runs pass 2 and writes (other ranks
    return None)."""
    from convlens_atlas._site import write_site

    note = note or (lambda s: None)
    progress = progress or _no_progress
    device = torch.device(device)
    if k < 1:
        raise ConvlensError(f"--top {k}: must be at least 1")
    pre = preprocess or Preprocess.for_model(model)
    hw = tuple(pre.input_size)
    unit_list = resolve_units(units)
    requested = parse_str_list(layers) if isinstance(layers, str) else list(layers or [])
    timings: dict[str, float] = {}

    # the dataset ---------------------------------------------------------------------------
    t = time.perf_counter()
    if isinstance(images, ImageDataset) or images:
        dataset = images if isinstance(images, ImageDataset) else open_dataset(images)
        source = "images"
        roots = list(dataset.sources)
    else:
        from convlens.data import mining_set

        with progress("embedded mining set (built once)", None) as advance:
            files = mining_set(progress=advance)
        dataset = open_dataset(files)
        source = "embedded mining set"
        roots = [files[0].parent] if files else []
    timings["dataset_s"] = time.perf_counter() - t

    # the layers and units --------------------------------------------------------------------
    rec = trace_model(model, torch.zeros(1, 3, *hw, device=device))
    chosen = _choose_layers(model, rec, requested, note)
    per_layer = _units_per_layer(rec, chosen, unit_list, note)
    deepest = chosen[-1]

    # pass 1 ----------------------------------------------------------------------------------
    created, device = init_distributed(device, model)
    rank, world = distributed_info()
    ckpt = None
    if checkpoint_root is not None:
        ckpt = Path(checkpoint_root) / f"pass1-rank{rank}-of{world}.pt"
        if not resume and ckpt.exists():
            ckpt.unlink()
    ckey = {"model": model_name, **(key or {}), "dataset": dataset.fingerprint()}
    resumed = {"n": 0}

    def on_resume(n: int) -> None:
        resumed["n"] = n
        note(f"atlas: resuming pass 1 from its checkpoint ({n} image(s) already mined)")

    t = time.perf_counter()
    mine_total = len(range(rank, len(dataset), world))
    try:
        with progress(
            f"pass 1: top-{k} of {sum(map(len, per_layer.values()))} units", mine_total
        ) as adv:

            def on_resume_adv(n: int) -> None:
                on_resume(n)
                adv(n)

            try:
                topks = mine_topk_layers(
                    model, chosen, dataset, channels=per_layer, k=k, per_image=1,
                    preprocess=pre, batch_size=batch_size, device=device, progress=adv,
                    stop_at=deepest, summaries=True, checkpoint=ckpt,
                    checkpoint_every=checkpoint_every, checkpoint_key=ckey,
                    on_resume=on_resume_adv,
                )  # fmt: skip
            except ConvlensError as exc:
                if "no images" in str(exc):
                    raise ConvlensError(
                        f"{dataset.describe()}: no readable image (every file was skipped)"
                    ) from None
                raise
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()
    timings["pass1_s"] = time.perf_counter() - t
    timings["pass1_images"] = topks[deepest].n_images
    if topks[deepest].n_images == 0:
        raise ConvlensError(f"{dataset.describe()}: no readable image (every file was skipped)")
    if rank != 0:
        return None

    # rules -----------------------------------------------------------------------------------
    t = time.perf_counter()
    x_ref = _reference_inputs(dataset, pre, device, source == "images")
    choices = {}
    for lay in chosen:
        choices[lay] = choose_rule(model, x_ref, lay, rule)
        c = choices[lay]
        fig = "n/a" if c.figure is None else f"{c.figure:.2f}"
        note(f"atlas {lay}: rule {c.rule} (image_specificity {fig}): {c.reason}")
    timings["rules_s"] = time.perf_counter() - t

    # pass 2 ----------------------------------------------------------------------------------
    t = time.perf_counter()
    layer_dirs = {lay: f"{i + 1}-{_safe(lay)}" for i, lay in enumerate(chosen)}
    p2 = _Pass2(model, dataset, pre, device, chosen, topks, choices, rec, hw, out_dir,
                layer_dirs, model_name, k)  # fmt: skip
    n_proj = p2.count()
    with progress(f"pass 2: {n_proj} projections", n_proj + p2.prepass_count()) as adv:
        p2.run(adv)
    timings["pass2_s"] = time.perf_counter() - t
    timings["pass2_projections"] = n_proj
    timings["pass2_images"] = len(p2.wanted)
    names = {i: _display(dataset, i, roots) for i in p2.wanted}

    # documents and site ------------------------------------------------------------------------
    t = time.perf_counter()
    info = getattr(model, "convlens_info", None)
    doc = {
        "schema_version": SCHEMA,
        "kind": "atlas",
        "paper": "Zeiler & Fergus 2014, Section 4, Fig. 2",
        "model": model_name,
        "weights": getattr(info, "weights", None),
        "random_weights": bool(getattr(info, "random_init", False)),
        "k": k,
        "per_image": 1,
        "input_shape": [3, *hw],
        "preprocess": pre.to_dict(),
        "dataset": {
            "source": source,
            "paths": [str(p) for p in dataset.sources] if source == "images" else [],
            "candidates": len(dataset),
            "images": topks[deepest].n_images,
            "shards": len(dataset.shards),
            "fingerprint": dataset.fingerprint(),
        },
        "world_size": topks[deepest].world_size,
        "summary_definition": {
            "mean": "mean activation over every position of every image",
            "rate": "fraction of positions with activation > 0 (activation rate)",
            "max_mean": "mean over images of the unit's strongest activation in the image",
            "quantiles": "quantiles of the per-image strongest activation, from a "
            f"{BINS}-bin power-of-two histogram sketch per unit (error < one bin width, "
            "sketch_bin_width)",
        },
        "quantiles": list(QUANTILES),
        "sketch_bins": BINS,
        "contrast": "per projection: 0.5 + p / (2 s) clipped, s = 99.5th percentile of |p| "
        "over the crop's non-zero values",
        "crops": "receptive-field box when smaller than the image, else the square holding "
        "90% of the projection mass of each unit's strongest projection (median over the "
        "layer's units; convlens.render.crops)",
        "image_specificity_threshold": SPECIFICITY_THRESHOLD,
        "layers": [],
    }
    layer_docs = []
    for li, lay in enumerate(chosen):
        topk = topks[lay]
        rf = rec.rf(lay)
        c = choices[lay]
        alias = [a for a, v in (getattr(model, "convlens_aliases", {}) or {}).items() if v == lay]
        summ = topk.summary.result()
        units_doc = []
        for row, ch in enumerate(topk.channels):
            top = []
            for r in range(k):
                img = int(topk.image[row, r])
                if img < 0:
                    continue
                y, x = int(topk.y[row, r]), int(topk.x[row, r])
                box = unit_box(rf, y, x, hw, p2.sides[lay])
                top.append({
                    "rank": r, "image": dataset.items[img].name, "name": names[img],
                    "image_index": img, "y": y, "x": x,
                    "activation": float(f"{float(topk.values[row, r]):.7g}"),
                    "crop": [int(v) for v in box],
                })  # fmt: skip
            bars, left, width = topk.summary.histogram(row)
            units_doc.append({
                "unit": int(ch), "summary": summ[row], "top": top,
                "histogram": {"counts": bars, "left": float(f"{left:.7g}"),
                              "width": float(f"{width:.7g}")},
                "files": p2.files.get((lay, int(ch)), {}),
            })  # fmt: skip
        ldoc = {
            "layer": lay,
            "index": li + 1,
            "alias": alias[0] if alias else None,
            "resolved": resolve_layer(model, lay).key,
            "dir": layer_dirs[lay],
            "receptive_field": rf.to_dict() if rf else None,
            "rf_share": _rf_share(rf, hw),
            "crop_size": list(p2.sides[lay]),
            "map_shape": list(topk.map_shape),
            "channels": int(rec.layer(lay).output_shape[1]),
            "units": len(topk.channels),
            "rule": c.rule,
            "rule_choice": c.to_dict(),
        }
        doc["layers"].append(ldoc)
        layer_docs.append({**ldoc, "schema_version": SCHEMA, "model": model_name, "k": k,
                           "unit_pages": units_doc})  # fmt: skip
    files = [write_json(out_dir / "atlas.json", doc)]
    for ld in layer_docs:
        files.append(write_json(out_dir / ld["dir"] / "layer.json", ld))
    files += write_site(out_dir, doc, layer_docs)
    timings["site_s"] = time.perf_counter() - t
    return AtlasResult(out_dir, doc, timings, resumed["n"], files)


def _no_progress(description: str, total: int | None):
    return contextlib.nullcontext(lambda n=1: None)


def _rf_share(rf, hw) -> float:
    if rf is None or rf.is_global:
        return 1.0
    return round(min(1.0, max(rf.size[0] / hw[0], rf.size[1] / hw[1])), 4)


def _reference_inputs(dataset: ImageDataset, pre: Preprocess, device, given: bool) -> torch.Tensor:
    """The photos the ``auto`` rule is measured on: the first readable images of the dataset
    when one was given, else the bundled photos (as the deconv probe does)."""
    import warnings

    xs = []
    if given:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pass 1 has said which files it skipped
            for _, img in dataset.iter_images():
                xs.append(pre(img))
                if len(xs) >= REFERENCE_IMAGES:
                    break
    if len(xs) < 2:
        from convlens.data import default_images, load_batch

        x, _ = load_batch(default_images()[:REFERENCE_IMAGES], pre)
        return x.to(device)
    return torch.stack(xs).to(device)


class _Pass2:
    """Project every filled top-k slot, in one ordered read of the images that hold them, a
    chunk of :data:`CHUNK_IMAGES` images at a time; cut, tile and draw each unit as soon as its
    last slot is done (memory: the pending units' tiles, uint8)."""

    def __init__(self, model, dataset, pre, device, layers, topks, choices, rec, hw, out_dir,
                 layer_dirs, model_name, k) -> None:  # fmt: skip
        self.model, self.dataset, self.pre, self.device = model, dataset, pre, device
        self.layers, self.topks, self.choices, self.hw = layers, topks, choices, hw
        self.rfs = {lay: rec.rf(lay) for lay in layers}
        self.out_dir, self.layer_dirs, self.model_name, self.k = out_dir, layer_dirs, model_name, k
        self.by_image: dict[int, list[tuple[str, int, int]]] = {}  # image -> (layer, row, rank)
        self.need: dict[tuple[str, int], int] = {}
        for lay in layers:
            tk = topks[lay]
            for row in range(len(tk.channels)):
                n = 0
                for r in range(tk.k):
                    img = int(tk.image[row, r])
                    if img >= 0:
                        self.by_image.setdefault(img, []).append((lay, row, r))
                        n += 1
                self.need[(lay, row)] = n
        self.wanted = sorted(self.by_image)
        self.sides: dict[str, tuple[int, int]] = {
            lay: crop_side(self.rfs[lay], hw) for lay in layers
        }
        self.nonlocal_layers = [lay for lay in layers if not is_local(self.rfs[lay], hw)]
        self.pending: dict[tuple[str, int], dict[int, tuple]] = {}
        self.files: dict[tuple[str, int], dict[str, str]] = {}

    def count(self) -> int:
        return sum(self.need.values())

    def prepass_count(self) -> int:
        return sum(
            1 for lay in self.nonlocal_layers for row in range(len(self.topks[lay].channels))
            if self.need[(lay, row)]
        )  # fmt: skip

    def _chunks(self, indices: list[int]):
        buf_i, buf_x = [], []
        for i, img in self.dataset.iter_images(indices):
            buf_i.append(i)
            buf_x.append(self.pre(img))
            if len(buf_i) == CHUNK_IMAGES:
                yield buf_i, torch.stack(buf_x).to(self.device)
                buf_i, buf_x = [], []
        if buf_i:
            yield buf_i, torch.stack(buf_x).to(self.device)

    def _project(self, lay: str, x: torch.Tensor, local: dict[int, int], slots, adv):
        """Project ``slots`` (row, rank) of ``lay`` whose images are rows ``local[image]`` of
        ``x``. The images go to :func:`project` ordered by how many of the slots they hold, most
        first: it runs one backward pass per seed of the busiest image of each batch of 16, so
        images with as many seeds batch together (a popular image holds the top-k of dozens of
        units)."""
        tk = self.topks[lay]
        count: dict[int, int] = {}
        for row, r in slots:
            img = int(tk.image[row, r])
            count[img] = count.get(img, 0) + 1
        order = sorted(count, key=lambda i: (-count[i], i))
        xs = x[[local[i] for i in order]]
        pos = {i: k for k, i in enumerate(order)}
        seeds = [
            Seed(pos[int(tk.image[row, r])], int(tk.channels[row]), int(tk.y[row, r]),
                 int(tk.x[row, r]))
            for row, r in slots
        ]  # fmt: skip
        res = project(self.model, xs, lay, seeds, rule=self.choices[lay].rule, progress=adv)
        return res.projections.detach().float().cpu().numpy()

    def run(self, adv) -> None:
        import warnings

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*skipped.*")  # said once in pass 1
            self._run(adv)

    def _run(self, adv) -> None:
        # the effective field of layers whose receptive field covers the image: each unit's
        # strongest projection measures it (convlens.render.crops.mass_side)
        if self.nonlocal_layers:
            first: dict[int, list[tuple[str, int, int]]] = {}
            for lay in self.nonlocal_layers:
                tk = self.topks[lay]
                for row in range(len(tk.channels)):
                    if int(tk.image[row, 0]) >= 0:
                        first.setdefault(int(tk.image[row, 0]), []).append((lay, row, 0))
            sides: dict[str, list[int]] = {lay: [] for lay in self.nonlocal_layers}
            for ids, x in self._chunks(sorted(first)):
                local = {i: j for j, i in enumerate(ids)}
                for lay in self.nonlocal_layers:
                    slots = [(row, r) for i in ids for la, row, r in first.get(i, []) if la == lay]
                    if not slots:
                        continue
                    proj = self._project(lay, x, local, slots, adv)
                    tk = self.topks[lay]
                    for p, (row, r) in zip(proj, slots, strict=True):
                        c = unit_center(
                            self.rfs[lay], int(tk.y[row, r]), int(tk.x[row, r]), self.hw
                        )
                        sides[lay].append(mass_side(p, c))
            for lay in self.nonlocal_layers:
                self.sides[lay] = crop_side(self.rfs[lay], self.hw, sides=sides[lay])
        for ids, x in self._chunks(self.wanted):
            local = {i: j for j, i in enumerate(ids)}
            img01 = self.pre.denormalize(x.detach().float().cpu()).numpy()
            for lay in self.layers:
                slots = [(row, r) for i in ids for la, row, r in self.by_image[i] if la == lay]
                if not slots:
                    continue
                proj = self._project(lay, x, local, slots, adv)
                tk = self.topks[lay]
                for p, (row, r) in zip(proj, slots, strict=True):
                    img = int(tk.image[row, r])
                    box = unit_box(self.rfs[lay], int(tk.y[row, r]), int(tk.x[row, r]), self.hw,
                                   self.sides[lay])  # fmt: skip
                    pt = resize(robust_stretch(cut(p, box, np.nan), background=BACKGROUND), TILE)
                    q = cut(img01[local[img]], box, np.nan)
                    qt = resize(np.where(np.isfinite(q), q, BACKGROUND), TILE)
                    self.pending.setdefault((lay, row), {})[r] = (_u8(pt), _u8(qt))
                    if len(self.pending[(lay, row)]) == self.need[(lay, row)]:
                        self._finish(lay, row)

    def _finish(self, lay: str, row: int) -> None:
        """Draw unit ``row`` of ``lay``: its Fig. 2 PNG and two thumbnails; free its tiles."""
        tiles = self.pending.pop((lay, row))
        tk = self.topks[lay]
        ch = int(tk.channels[row])
        ranks = sorted(tiles)
        names = [_short_name(self.dataset, int(tk.image[row, r])) for r in ranks]
        acts = [float(tk.values[row, r]) for r in ranks]
        unit = UnitTiles(ch, [tiles[r][0] / 255.0 for r in ranks], [tiles[r][1] / 255.0 for r in ranks],
                         acts, names)  # fmt: skip
        d = self.out_dir / self.layer_dirs[lay] / "img"
        d.mkdir(parents=True, exist_ok=True)
        stem = f"u{ch:04d}"
        c = self.choices[lay]
        side = self.sides[lay]
        title = [
            f"Fig. 2 · {lay} unit {ch} · {self.model_name}",
            f"top-{len(ranks)} activations over {tk.n_images} images, each from a different "
            f"image · rule {c.rule} · crop {side[0]}x{side[1]} px",
        ]
        caption = [
            "Left: the activations projected to pixels (each tile contrast-normalised on its "
            "own: 0.5 + p/2s, grey = 0); right: the image patches they come from (receptive "
            "field, light grey outside the image). Numbers: activation values; names: images.",
        ]
        fig2_canvas([unit], title, caption, per_row=1).save(d / f"{stem}_fig2.png")
        _save_png(tiles[ranks[0]][1], d / f"{stem}_patch.png")
        _save_png(tiles[ranks[0]][0], d / f"{stem}_proj.png")
        base = f"img/{stem}"
        self.files[(lay, ch)] = {"fig2": f"{base}_fig2.png", "patch": f"{base}_patch.png",
                                 "projection": f"{base}_proj.png", "page": f"{stem}.html"}  # fmt: skip


def _short_name(dataset: ImageDataset, index: int) -> str:
    it = dataset.items[index]
    return Path(it.member).name if it.member is not None else it.path.name


def _u8(a: np.ndarray) -> np.ndarray:
    return (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)


def _save_png(a: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(a).save(tmp, format="PNG")


def remove_checkpoints(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
