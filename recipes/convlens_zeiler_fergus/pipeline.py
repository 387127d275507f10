"""The whole reproduction, step by step: data → train → evaluate → analyse → report.

    convlens recipe zeiler-fergus                                  # the miniature, CPU, minutes
    convlens recipe zeiler-fergus --data /data/imagenet --experiment table2 --members 5
    torchrun --standalone --nproc_per_node=8 -m convlens_zeiler_fergus --data /data/imagenet

Layout of ``--out`` (default ``runs/zeiler-fergus``)::

    data/                       the miniature's generated ImageFolder (only without --data)
    cache/                      the miniature's packs and mean image
    <experiment>/               one per experiment (…/member<k>/ with --members > 1)
        config.json             the resolved TrainConfig
        metrics.jsonl           step and epoch records
        checkpoints/last.pt     the resumable checkpoint (atomic, weights_only-loadable)
        snapshots/epoch_NNN.pt  weights at Fig. 4's epochs
        model.pt                final weights + model config + mean image + classes
        eval.json               ten-crop val top-1/top-5, train top-1, timings
        val_probs.npy, val_labels.npy   the softmax outputs ensembles are built from
        figures/                filters, filter evolution, curves, Fig. 4
        probes/                 every probe's output, and its own index.html
    report/index.html           our numbers beside Tables 2 and 3, the figures
"""

from __future__ import annotations

import platform
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from convlens.errors import ConvlensError
from convlens.io import atomic_path, write_json
from convlens_zeiler_fergus import analysis
from convlens_zeiler_fergus.checkpoint import load_checkpoint, save_checkpoint
from convlens_zeiler_fergus.config import TrainConfig
from convlens_zeiler_fergus.data import DataBundle, prepare_data, resolve_workers
from convlens_zeiler_fergus.distributed import DistEnv
from convlens_zeiler_fergus.evaluate import predict, topk_errors
from convlens_zeiler_fergus.experiments import model_from_dict
from convlens_zeiler_fergus.train import Trainer, arch_dict, read_metrics

__all__ = ["run_dirs", "prepare", "train_and_evaluate", "analyse", "Logger"]


class Logger:
    """Diagnostics on stderr (rank 0 only), timestamped from the start of the run."""

    def __init__(self, dist: DistEnv, quiet: bool = False) -> None:
        self.dist, self.quiet, self.t0 = dist, quiet, time.perf_counter()

    def __call__(self, msg: str) -> None:
        if self.dist.is_main and not self.quiet:
            t = time.perf_counter() - self.t0
            print(f"[zeiler-fergus {t:7.1f}s] {msg}", file=sys.stderr, flush=True)


def run_dirs(out: Path, experiment: str, members: int) -> list[Path]:
    base = Path(out) / experiment
    return [base] if members == 1 else [base / f"member{k}" for k in range(members)]


def prepare(
    cfg: TrainConfig, out: Path, dist: DistEnv, device: torch.device, log: Callable[[str], None]
) -> tuple[TrainConfig, DataBundle]:
    """The data: the miniature's generated folder (rank 0 writes it) or ``cfg.data``."""
    if cfg.is_miniature:
        from convlens_zeiler_fergus.synthetic import write_image_folder

        root = out / "data"
        if dist.is_main:
            t = time.perf_counter()
            write_image_folder(
                root,
                cfg.mini_train_per_class,
                cfg.mini_val_per_class,
                cfg.mini_image_size,
                cfg.mini_data_seed,
            )
            log(f"miniature data in {root} ({time.perf_counter() - t:.1f} s)")
        dist.barrier()
        data_cfg = cfg.replace(data=str(root), cache_dir=cfg.cache_dir or str(out / "cache"))
    else:
        data_cfg = cfg
    bundle = prepare_data(data_cfg, dist, device, log=log)
    log(
        f"data: {len(bundle.train)} train / {len(bundle.val)} val images, "
        f"{len(bundle.classes)} classes, crops from {bundle.source}"
    )
    return cfg if not cfg.is_miniature else cfg.replace(cache_dir=data_cfg.cache_dir), bundle


def _fresh(run_dir: Path) -> None:
    for name in ("checkpoints", "snapshots", "figures", "probes"):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    for name in (
        "metrics.jsonl",
        "eval.json",
        "model.pt",
        "val_probs.npy",
        "val_labels.npy",
        "run.json",
        "config.json",
    ):
        (run_dir / name).unlink(missing_ok=True)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


def train_and_evaluate(
    cfg: TrainConfig,
    run_dir: Path,
    bundle: DataBundle,
    dist: DistEnv,
    device: torch.device,
    resume: bool,
    fresh: bool,
    log: Callable[[str], None],
    progress: bool | None = None,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train (or resume) one run, then evaluate it (ten crops on val, ``train_eval_images``
    training images) and write ``model.pt``, ``eval.json``, ``val_probs.npy``. An existing
    ``eval.json`` of the same final step is reused."""
    if fresh and dist.is_main:
        _fresh(run_dir)
    dist.barrier()
    log(f"{run_dir.name}: training {cfg.experiment} for {cfg.epochs} epochs (seed {cfg.seed})")
    trainer = Trainer(cfg, run_dir, bundle, dist, device, log=log, progress=progress)
    result = trainer.fit(resume=resume, on_step=on_step)
    if result.stopped:
        return {"stopped": True, "epochs_done": result.epochs_done}
    eval_path = run_dir / "eval.json"
    if eval_path.is_file():
        import json

        old = json.loads(eval_path.read_text())
        if old.get("global_step") == result.global_step:
            return old
    model, prep, speed = trainer.model, trainer.prep, trainer.speed
    workers = resolve_workers(cfg, dist)
    pin = cfg.pin_memory and device.type == "cuda"
    local_b = max(1, cfg.batch_size // dist.world_size)
    t0 = time.perf_counter()

    def ten_crop(split, indices):
        return predict(model, bundle, split, indices, prep, cfg.eval_crops, local_b, dist,
                       speed.amp_dtype, workers, pin)  # fmt: skip

    probs, labels = ten_crop(bundle.val, range(len(bundle.val)))
    val = topk_errors(probs, labels) | {"crops": cfg.eval_crops}
    n_tr = min(cfg.train_eval_images, len(bundle.train))
    g = torch.Generator().manual_seed(cfg.seed + 17)
    tr_idx = torch.randperm(len(bundle.train), generator=g)[:n_tr].sort().values.tolist()
    if tr_idx:
        tp, tl = ten_crop(bundle.train, tr_idx)
        train = topk_errors(tp, tl) | {"crops": cfg.eval_crops}
    else:
        train = {"n": 0, "top1_err": None, "top5_err": None}
    eval_s = time.perf_counter() - t0
    history = [r for r in read_metrics(run_dir / "metrics.jsonl")]
    steps = [r for r in history if r.get("kind") == "step"]
    record = {
        "experiment": cfg.experiment,
        "seed": cfg.seed,
        "epochs": result.epochs_done,
        "global_step": result.global_step,
        "val": val,
        "train": train,
        "train_wall_s": steps[-1]["elapsed_s"] if steps else None,
        "eval_wall_s": eval_s,
        "median_img_per_s": float(np.median([r["img_per_s"] for r in steps])) if steps else None,
        "speed": result.speed,
        "data_source": bundle.source,
        "device": str(device),
        "device_name": (
            torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or platform.machine()
        ),
        "world_size": dist.world_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__,
    }
    if dist.is_main:
        _save_npy(run_dir / "val_probs.npy", probs.numpy().astype(np.float16))
        _save_npy(run_dir / "val_labels.npy", labels.numpy().astype(np.int64))
        save_checkpoint(
            run_dir / "model.pt",
            {
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "model_config": arch_dict(model),
                "config": cfg.to_dict(),
                "mean_image": bundle.mean_image.float().cpu(),
                "classes": list(bundle.classes),
                "eval": {"val_top1_err": val["top1_err"], "val_top5_err": val["top5_err"]},
            },
        )
        write_json(eval_path, record)
    log(
        f"{run_dir.name}: val top-1 {val['top1_err']:.2f}% top-5 {val['top5_err']:.2f}% "
        f"({cfg.eval_crops} crops), train top-1 {train['top1_err']:.2f}%"
    )
    dist.barrier()
    return record


def _probe_images(bundle: DataBundle, n: int) -> list[Path]:
    """``n`` validation files spread evenly over the (class-sorted) split."""
    samples = bundle.val_split.samples
    if n <= 0 or not samples:
        return []
    idx = np.linspace(0, len(samples) - 1, min(n, len(samples))).round().astype(int)
    # one per class first when there are enough classes: step through classes
    by_class: dict[int, list[str]] = {}
    for path, label in samples:
        by_class.setdefault(label, []).append(path)
    labels = sorted(by_class)
    if len(labels) >= n:
        pick = np.linspace(0, len(labels) - 1, n).round().astype(int)
        return [Path(by_class[labels[i]][0]) for i in pick]
    return [Path(samples[i][0]) for i in idx]


def analyse(
    cfg: TrainConfig,
    run_dir: Path,
    bundle: DataBundle,
    device: torch.device,
    log: Callable[[str], None],
    with_probes: bool = True,
) -> dict[str, Any]:
    """Figures of one trained run (rank 0): conv1 filters (Fig. 6(c)), their evolution over the
    snapshots, the curves, Fig. 4 through the deconv plugin, and every probe."""
    figs = run_dir / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    ckpt = load_checkpoint(run_dir / "model.pt")
    net = analysis.load_trained(run_dir / "model.pt", for_probes=False)
    out: dict[str, Any] = {"figures": {}}
    conv1 = net.features.conv1.weight
    analysis.render_filters(conv1, figs / "filters_conv1.png")
    out["figures"]["filters"] = "figures/filters_conv1.png"
    analysis.plot_curves(
        read_metrics(run_dir / "metrics.jsonl"), figs / "curves.png", title=cfg.experiment
    )
    out["figures"]["curves"] = "figures/curves.png"

    snaps = sorted((run_dir / "snapshots").glob("epoch_*.pt"))
    snap_models = []
    for s in snaps:
        sc = load_checkpoint(s)
        m = model_from_dict(sc["model_config"])
        m.load_state_dict(sc["model"])
        snap_models.append((f"epoch {int(sc['epoch'])}", m))
    if snap_models:
        analysis.render_filter_evolution(
            [(lab, m.features.conv1.weight) for lab, m in snap_models],
            figs / "filter_evolution.png",
        )
        out["figures"]["filter_evolution"] = "figures/filter_evolution.png"
        out["snapshot_epochs"] = [lab for lab, _ in snap_models]
    if snap_models and cfg.evolution_images > 0:
        # Fig. 4: the strongest activation of a few features, at every snapshot
        n_ev = min(cfg.evolution_images, len(bundle.train))
        g = torch.Generator().manual_seed(cfg.seed + 29)
        ev_idx = torch.randperm(len(bundle.train), generator=g)[:n_ev].sort().values.tolist()
        crop, size = cfg.input_size, bundle.size
        o = (size - crop) // 2
        xs = []
        for i in range(0, len(ev_idx), 256):
            items = [bundle.train[j] for j in ev_idx[i : i + 256]]
            if bundle.encoded:
                from convlens_zeiler_fergus.data import decode_batch

                x8 = decode_batch([it[0] for it in items], size, torch.device("cpu"))
            else:
                x8 = torch.stack([it[0] for it in items])
            xs.append(x8[:, :, o : o + crop, o : o + crop].float())
        channel_mean = bundle.mean_image.float().mean(dim=(1, 2))
        # the probe model's input space: 0-255 RGB minus the per-channel mean colour
        inputs = (torch.cat(xs) if xs else torch.zeros(0, 3, crop, crop)) - channel_mean[
            None, :, None, None
        ]
        wrapped = [
            (lab, analysis.probe_model(m, bundle.mean_image, bundle.classes).to(device))
            for lab, m in snap_models
        ]
        evo = analysis.run_feature_evolution(
            wrapped,
            inputs.to(device),
            ["conv1", "conv2", "conv3", "conv4", "conv5"],
            cfg.evolution_channels,
            figs,
            analysis.probe_preprocess(crop, size, channel_mean.tolist()),
            cfg.seed,
            log,
        )
        evo["figures"] = [str(Path(f).relative_to(run_dir)) for f in evo.get("figures", [])]
        out["feature_evolution"] = evo
    if with_probes and cfg.probes:
        model = analysis.probe_model(
            net,
            ckpt["mean_image"],
            ckpt["classes"],
            weights=str(run_dir / "model.pt"),
            name=f"zeiler-fergus/{cfg.experiment}",
        ).to(device)
        images = _probe_images(bundle, cfg.probe_images)
        out["probe_images"] = [str(p) for p in images]
        subst = {"{val}": str(bundle.val_split.root), "{train}": str(bundle.train_split.root)}
        popts = {
            name: {k: subst.get(v, v) if isinstance(v, str) else v for k, v in o.items()}
            for name, o in cfg.probe_options.items()
        }
        out["probes"] = analysis.run_probes(
            model, images, run_dir / "probes", device, cfg.probes, cfg.seed, log, popts
        )
    write_json(run_dir / "analysis.json", out)
    return out


def experiment_list(names: Sequence[str]) -> list[str]:
    """Expand ``table2`` / ``table3`` and check the names."""
    from convlens_zeiler_fergus.experiments import EXPERIMENTS, get_experiment

    out: list[str] = []
    for n in names or ["zfnet"]:
        if n == "table2":
            group = ["alexnet", "zfnet", "zfnet-wide"]
        elif n == "table3":
            group = list(EXPERIMENTS)
        else:
            group = [get_experiment(n).name]
        out += [g for g in group if g not in out]
    return out


def check_device_batch(cfg: TrainConfig, dist: DistEnv) -> None:
    if cfg.batch_size % dist.world_size:
        raise ConvlensError(
            f"--batch-size {cfg.batch_size} must be divisible by the {dist.world_size} ranks"
        )
