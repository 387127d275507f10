"""Training exactly as Section 3 of Zeiler & Fergus (2014), fast, and without ever losing progress.

    convlens recipe zeiler-fergus --data /data/imagenet --experiment zfnet
    convlens recipe zeiler-fergus --data /data/imagenet --experiment zfnet --resume
    torchrun --standalone --nproc_per_node=8 -m convlens_zeiler_fergus --data /data/imagenet

The update (:class:`TrainStep`, also what ``benchmarks/train_throughput.py`` times): forward
under bf16 autocast (on CUDA) with ``channels_last`` weights and inputs, cross-entropy in fp32,
backward, SGD with momentum 0.9 (the fused kernel where the build has it), then **feature scale
clipping** (Section 3): every conv filter whose RMS exceeds 10⁻¹ is rescaled to RMS 10⁻¹
(:func:`renormalize_filters_`). The learning rate starts at 10⁻² and is divided by 10 when the
validation error plateaus (``ReduceLROnPlateau`` on the per-epoch centre-crop top-1 error; the
paper did this by hand).

The loop (:class:`Trainer`): batches in the order of :class:`~.data.EpochBatchSampler`, crops and
flips from :func:`~.data.crop_params`, DDP when launched by ``torchrun``; a record in
``metrics.jsonl`` every ``log_every`` steps (mean loss, lr, img/s, filters clipped) and at every
epoch end (train loss, validation error, lr), mirrored to TensorBoard when it is installed; a
rich progress bar (epoch, img/s, loss, lr, ETA); an atomic checkpoint (``checkpoints/last.pt``) at
every epoch end, every ``ckpt_minutes`` and on SIGTERM, taken at a log boundary; weight snapshots
at Fig. 4's epochs. ``--resume`` restores model, optimizer, scheduler, position and every rank's
RNG and drops the ``metrics.jsonl`` records written after the checkpoint, so the loss curve
continues exactly as an uninterrupted run's.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from convlens.errors import ConvlensError
from convlens.io import atomic_open, write_json
from convlens.probe import seed_everything
from convlens_zeiler_fergus.checkpoint import check_resume, load_checkpoint, save_checkpoint
from convlens_zeiler_fergus.config import TrainConfig
from convlens_zeiler_fergus.data import (
    BatchPrep,
    DataBundle,
    EpochBatchSampler,
    crop_params,
    resolve_workers,
)
from convlens_zeiler_fergus.distributed import DistEnv
from convlens_zeiler_fergus.evaluate import predict, topk_errors
from convlens_zeiler_fergus.experiments import build_model

__all__ = [
    "renormalize_filters_",
    "SpeedPlan",
    "resolve_speed",
    "make_optimizer",
    "TrainStep",
    "Trainer",
    "TrainResult",
    "arch_dict",
    "read_metrics",
]


# --------------------------------------------------------------------------------------------
# The update
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def renormalize_filters_(model: nn.Module, radius: float = 0.1) -> torch.Tensor:
    """Section 3: "we renormalize each filter in the convolutional layers whose RMS value exceeds
    a fixed radius of 10⁻¹ to this fixed radius". A filter is one output channel's weights
    ``W[o]`` (all input channels and taps; not the bias); RMS = ``sqrt(mean(W[o]²))``. Returns
    the number of filters rescaled as a 0-d tensor on the weights' device (no host sync)."""
    clipped = None
    if radius <= 0:
        return torch.zeros((), dtype=torch.int64)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            w = m.weight
            rms = w.detach().float().pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
            scale = (radius / rms.clamp_min(1e-12)).clamp(max=1.0)
            w.mul_(scale.to(w.dtype))
            n = (rms > radius).sum()
            clipped = n if clipped is None else clipped + n
    return clipped if clipped is not None else torch.zeros((), dtype=torch.int64)


@dataclass(frozen=True)
class SpeedPlan:
    """How the step runs on this device (recorded in ``run.json``)."""

    amp_dtype: torch.dtype | None  # bf16 autocast, or None for fp32
    channels_last: bool
    fused: bool
    compile: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "precision": "bf16-autocast" if self.amp_dtype is not None else "fp32",
            "channels_last": self.channels_last,
            "optimizer": "fused" if self.fused else "foreach",
            "compile": self.compile,
        }


def _fused_sgd_available(device: torch.device) -> bool:
    try:
        p = torch.zeros(2, device=device, requires_grad=True)
        opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, fused=True)
        p.grad = torch.ones_like(p)
        opt.step()
        return True
    except (RuntimeError, TypeError, ValueError):
        return False


def resolve_speed(cfg: TrainConfig, device: torch.device) -> SpeedPlan:
    """``auto`` → bf16 autocast and channels_last on CUDA (and cuDNN autotuning), fp32 on the
    CPU; the fused SGD kernel whenever this build supports it on ``device`` (else ``foreach``,
    with a warning when it was asked for explicitly)."""
    cuda = device.type == "cuda"
    if cuda:  # fixed input shapes: let cuDNN pick the fastest kernels once
        torch.backends.cudnn.benchmark = True
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda)
    if bf16 and cuda and not torch.cuda.is_bf16_supported():
        raise ConvlensError(f"precision bf16: {torch.cuda.get_device_name(device)} lacks bf16")
    cl = cfg.channels_last == "on" or (cfg.channels_last == "auto" and cuda)
    fused = False
    if cfg.fused_optimizer != "off":
        fused = _fused_sgd_available(device)
        if not fused and cfg.fused_optimizer == "on":
            warnings.warn(f"fused SGD is not available on {device}; using foreach", stacklevel=2)
    return SpeedPlan(torch.bfloat16 if bf16 else None, cl, fused, bool(cfg.compile))


def make_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool) -> torch.optim.SGD:
    """Section 3: SGD, lr 10⁻², momentum 0.9 (weight decay as configured: none by default)."""
    kwargs: dict[str, Any] = {"fused": True} if fused else {"foreach": True}
    return torch.optim.SGD(
        model.parameters(),
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        **kwargs,
    )


class TrainStep:
    """One SGD update on a prepared batch: ``loss, clipped = step(x, y)``.

    ``forward_model`` is what runs the forward pass (the model, or its DDP / ``torch.compile``
    wrapper); ``model`` is the bare module whose conv filters are renormalised."""

    def __init__(
        self,
        forward_model: nn.Module,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        amp_dtype: torch.dtype | None,
        rms_radius: float,
    ) -> None:
        self.forward_model, self.model, self.optimizer = forward_model, model, optimizer
        self.amp_dtype, self.rms_radius = amp_dtype, rms_radius

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(
            x.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
        ):
            logits = self.forward_model(x)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        clipped = renormalize_filters_(self.model, self.rms_radius)
        return loss.detach(), clipped


def arch_dict(model: nn.Module) -> dict[str, Any]:
    """The model's config as stored in checkpoints (``experiments.model_from_dict`` reads it)."""
    from convlens.models import AlexNet

    return {"arch": "alexnet" if isinstance(model, AlexNet) else "zfnet", **model.config.to_dict()}


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------
# Progress display
# --------------------------------------------------------------------------------------------


class _Progress:
    """Rich progress bar (epoch, img/s, loss, lr, ETA of the run) on a terminal; one line per
    epoch otherwise."""

    def __init__(
        self, enabled: bool, total_epochs: int, steps_per_epoch: int, log: Callable[[str], None]
    ) -> None:
        self.log, self.total_epochs, self.steps = log, total_epochs, steps_per_epoch
        self.bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self.bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn(
                    "{task.fields[ips]:>7} img/s  loss {task.fields[loss]}  lr {task.fields[lr]}"
                ),
                TimeElapsedColumn(),
                TextColumn("ETA {task.fields[eta]}"),
                console=Console(stderr=True),
                transient=False,
            )
            self.bar.start()
            self.task = None

    def epoch(self, epoch: int, start_step: int) -> None:
        if self.bar is not None:
            if self.task is not None:
                self.bar.remove_task(self.task)
            self.task = self.bar.add_task(
                f"epoch {epoch}/{self.total_epochs}",
                total=self.steps,
                completed=start_step,
                ips="-",
                loss="-",
                lr="-",
                eta="-",
            )

    def update(
        self, step: int, loss: float, lr: float, ips: float, remaining_steps: int, step_rate: float
    ) -> None:
        if self.bar is not None and self.task is not None:
            eta = _hms(remaining_steps / step_rate) if step_rate > 0 else "-"
            self.bar.update(
                self.task,
                completed=step,
                ips=f"{ips:,.0f}",
                loss=f"{loss:.4f}",
                lr=f"{lr:.2e}",
                eta=eta,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _hms(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def progress_wanted() -> bool:
    import sys

    return sys.stderr.isatty() and not os.environ.get("CONVLENS_NO_PROGRESS")


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    run_dir: Path
    epochs_done: int
    global_step: int
    wall_s: float
    stopped: bool = False  # stopped by SIGTERM before the last epoch
    speed: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


class _StopSignal:
    """SIGTERM/SIGUSR1 → checkpoint at the next log boundary and stop (preemption)."""

    def __init__(self) -> None:
        self.flag = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
                if sig is not None:
                    self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.flag = True

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Trainer:
    """Trains ``cfg.experiment`` on ``data`` into ``run_dir`` (see the module docstring).

    ``on_step(global_step)`` is called after every update: a test hook (raise to simulate a
    crash) and a place for extra logging."""

    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: str | Path,
        data: DataBundle,
        dist: DistEnv | None = None,
        device: torch.device | str = "cpu",
        log: Callable[[str], None] | None = None,
        progress: bool | None = None,
    ) -> None:
        self.cfg, self.run_dir, self.data = cfg, Path(run_dir), data
        self.dist = dist or DistEnv()
        self.device = torch.device(device)
        self.log = log if log is not None else (lambda s: None)
        self.show_progress = progress_wanted() if progress is None else progress
        self.ckpt_path = self.run_dir / "checkpoints" / "last.pt"
        self.metrics_path = self.run_dir / "metrics.jsonl"
        if cfg.batch_size % self.dist.world_size:
            raise ConvlensError(
                f"batch size {cfg.batch_size} is not divisible by {self.dist.world_size} ranks"
            )

    # -- checkpoint helpers ----------------------------------------------------------------

    def _gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        dev = self.device if self.dist.backend == "nccl" else torch.device("cpu")
        return [x.cpu() for x in self.dist.gather_tensors(t.to(dev))]

    def _rng_payload(self) -> dict[str, Any]:
        cpu = self._gather(torch.get_rng_state())
        cuda = (
            self._gather(torch.cuda.get_rng_state(self.device))
            if self.device.type == "cuda"
            else []
        )
        return {"torch_cpu": cpu, "cuda": cuda, "world_size": self.dist.world_size}

    def _restore_rng(self, rng: dict[str, Any]) -> None:
        if int(rng.get("world_size", 1)) != self.dist.world_size:
            warnings.warn(
                f"resuming on {self.dist.world_size} rank(s) from a checkpoint of "
                f"{rng.get('world_size')}: dropout masks will differ from the uninterrupted run",
                stacklevel=2,
            )
            return
        torch.set_rng_state(rng["torch_cpu"][self.dist.rank])
        if self.device.type == "cuda" and rng.get("cuda"):
            torch.cuda.set_rng_state(rng["cuda"][self.dist.rank], self.device)

    def _truncate_metrics(self, global_step: int) -> None:
        """Drop the records written after the checkpoint (they will be written again)."""
        if not self.dist.is_main or not self.metrics_path.exists():
            return
        keep = [
            r for r in read_metrics(self.metrics_path) if r.get("global_step", 0) <= global_step
        ]
        with atomic_open(self.metrics_path, "w", encoding="utf-8") as fh:
            for r in keep:
                fh.write(json.dumps(r) + "\n")

    # -- the run ---------------------------------------------------------------------------

    def fit(
        self, resume: bool = False, on_step: Callable[[int], None] | None = None
    ) -> TrainResult:
        cfg, dist, device, data = self.cfg, self.dist, self.device, self.data
        t_start = time.perf_counter()
        num_classes = len(data.classes)
        speed = resolve_speed(cfg, device)

        seed_everything(cfg.seed)  # identical initial weights on every rank
        model = build_model(cfg, num_classes).to(device)
        if speed.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if dist.rank:  # dropout masks differ per rank, reproducibly
            torch.manual_seed(cfg.seed + 7919 * dist.rank)
        optimizer = make_optimizer(model, cfg, speed.fused)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer,
            mode="min",
            factor=cfg.lr_factor,
            patience=cfg.plateau_patience,
            threshold=cfg.plateau_threshold,
            threshold_mode="abs",
            min_lr=cfg.min_lr,
        )

        epoch, step, global_step, elapsed = 0, 0, 0, 0.0
        epoch_loss = [0.0, 0]  # sum of logged mean losses × steps, steps (this epoch)
        if resume and self.ckpt_path.exists():
            ckpt = load_checkpoint(self.ckpt_path)
            changed = check_resume(ckpt["config"], cfg.to_dict())
            if changed:
                self.log(f"resume: changed {', '.join(changed)}")
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            epoch, step, global_step = (
                int(ckpt["epoch"]),
                int(ckpt["step"]),
                int(ckpt["global_step"]),
            )
            elapsed = float(ckpt["elapsed_s"])
            epoch_loss = [float(ckpt["epoch_loss"][0]), int(ckpt["epoch_loss"][1])]
            self._restore_rng(ckpt["rng"])
            self._truncate_metrics(global_step)
            self.log(f"resumed from {self.ckpt_path}: epoch {epoch} done, step {step} of the next")
        elif not resume and self.ckpt_path.exists():
            raise ConvlensError(
                f"{self.ckpt_path} exists: pass --resume to continue it or --fresh to start over"
            )
        elif resume:
            self.log(f"--resume: no checkpoint in {self.run_dir}, starting from scratch")
            self._truncate_metrics(0)
        if dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.run_dir / "config.json", cfg.to_dict())
            if not resume:
                self.metrics_path.unlink(missing_ok=True)

        forward_model: nn.Module = model
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # (ZFNet/AlexNet have no buffers: nothing to broadcast)
            forward_model = DDP(
                model,
                device_ids=[device.index] if device.type == "cuda" else None,
                gradient_as_bucket_view=True,
            )
        if speed.compile:
            forward_model = torch.compile(forward_model)
        train_step = TrainStep(
            forward_model, model, optimizer, speed.amp_dtype, cfg.filter_rms_radius
        )
        prep = BatchPrep(data.mean_image, cfg.input_size, device, speed.channels_last)
        workers = resolve_workers(cfg, dist)
        pin = cfg.pin_memory and device.type == "cuda"
        n_train = len(data.train)
        steps_per_epoch = n_train // cfg.batch_size
        local_b = cfg.batch_size // dist.world_size
        snapshots = set(cfg.scaled_snapshot_epochs())
        val_indices = range(len(data.val))
        tb = self._tensorboard()
        bar = _Progress(self.show_progress and dist.is_main, cfg.epochs, steps_per_epoch, self.log)
        history = [r for r in read_metrics(self.metrics_path) if r.get("kind") == "epoch"]
        stopped = False
        metrics_fh = open(self.metrics_path, "a", encoding="utf-8") if dist.is_main else None  # noqa: SIM115
        session_start = time.perf_counter()
        last_ckpt, last_ckpt_step = time.perf_counter(), global_step

        def elapsed_now() -> float:
            return elapsed + time.perf_counter() - session_start

        def write(record: dict[str, Any]) -> None:
            if metrics_fh is not None:
                metrics_fh.write(json.dumps(record) + "\n")
                metrics_fh.flush()
            if tb is not None:
                for k, v in record.items():
                    if isinstance(v, (int, float)) and k not in ("epoch", "step", "global_step"):
                        tb.add_scalar(f"{record['kind']}/{k}", v, record["global_step"])

        def checkpoint(at_epoch: int, at_step: int) -> None:
            payload = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": at_epoch,
                "step": at_step,
                "global_step": global_step,
                "elapsed_s": elapsed_now(),
                "epoch_loss": [float(epoch_loss[0]), int(epoch_loss[1])],
                "rng": self._rng_payload(),
                "sampler": {
                    "seed": cfg.seed,
                    "epoch": at_epoch,
                    "position": at_step,
                    "batch_size": cfg.batch_size,
                    "n": n_train,
                },
                "config": cfg.to_dict(),
                "model_config": arch_dict(model),
                "mean_image": data.mean_image.float().cpu(),
                "classes": list(data.classes),
            }
            if dist.is_main:
                save_checkpoint(self.ckpt_path, payload)

        try:
            with _StopSignal() as stop:
                while epoch < cfg.epochs and not stopped:
                    sampler = EpochBatchSampler(
                        n_train,
                        cfg.batch_size,
                        cfg.seed,
                        epoch,
                        dist.rank,
                        dist.world_size,
                        start_step=step,
                    )
                    loader = data.loader(data.train, sampler, workers, pin)
                    bar.epoch(epoch + 1, step)
                    model.train()
                    acc_loss = torch.zeros((), device=device)
                    acc_clip = torch.zeros((), device=device, dtype=torch.int64)
                    acc_n = 0
                    t_log = time.perf_counter()
                    t_epoch, steps_this_session = time.perf_counter(), 0
                    for xb, yb in loader:
                        dy, dx, fl = crop_params(
                            cfg.seed,
                            epoch,
                            step,
                            cfg.batch_size,
                            data.size,
                            cfg.input_size,
                            cfg.flip,
                        )
                        sl = slice(dist.rank * local_b, (dist.rank + 1) * local_b)
                        x = prep.crops(data.to_device_uint8(xb, device), dy[sl], dx[sl], fl[sl])
                        y = yb.to(device, non_blocking=True)
                        loss, clipped = train_step(x, y)
                        acc_loss += loss
                        acc_clip += clipped.to(device)
                        acc_n += 1
                        step += 1
                        global_step += 1
                        steps_this_session += 1
                        if on_step is not None:
                            on_step(global_step)
                        if acc_n < cfg.log_every and step < steps_per_epoch:
                            continue
                        # -- a log boundary: reduce, record, maybe checkpoint -------------
                        stats = torch.stack([acc_loss.float(), acc_clip.float()])
                        stats = dist.all_reduce_sum(stats) / dist.world_size
                        mean_loss = float(stats[0]) / acc_n
                        now = time.perf_counter()
                        ips = acc_n * cfg.batch_size / max(now - t_log, 1e-9)
                        lr = optimizer.param_groups[0]["lr"]
                        if not math.isfinite(mean_loss):
                            raise ConvlensError(
                                f"loss is {mean_loss} at epoch {epoch + 1} step {step}: training "
                                "diverged (lower --lr, or check the data)"
                            )
                        epoch_loss[0] += mean_loss * acc_n
                        epoch_loss[1] += acc_n
                        write(
                            {
                                "kind": "step",
                                "epoch": epoch + 1,
                                "step": step,
                                "global_step": global_step,
                                "loss": mean_loss,
                                "lr": lr,
                                "img_per_s": ips,
                                "filters_clipped": float(stats[1]) / acc_n,
                                "elapsed_s": elapsed_now(),
                            }
                        )
                        rate = steps_this_session / max(now - t_epoch, 1e-9)
                        remaining = (cfg.epochs - epoch) * steps_per_epoch - step
                        bar.update(step, mean_loss, lr, ips, remaining, rate)
                        acc_loss.zero_()
                        acc_clip.zero_()
                        acc_n, t_log = 0, now
                        if step < steps_per_epoch:
                            due = (
                                cfg.ckpt_every_steps > 0
                                and global_step - last_ckpt_step >= cfg.ckpt_every_steps
                            ) or ((now - last_ckpt) / 60 >= cfg.ckpt_minutes)
                            due = dist.broadcast_flag(bool(due), device)
                            halt = dist.any_flag(stop.flag, device)
                            if due or halt:
                                checkpoint(epoch, step)
                                last_ckpt, last_ckpt_step = time.perf_counter(), global_step
                            if halt:
                                stopped = True
                                self.log(
                                    f"stop signal: checkpoint at epoch {epoch + 1} step "
                                    f"{step}; continue with --resume"
                                )
                                break
                    if stopped:
                        break
                    # -- epoch end: validate, anneal, snapshot, checkpoint ----------------
                    probs, labels = predict(
                        model,
                        data,
                        data.val,
                        val_indices,
                        prep,
                        cfg.epoch_eval_crops,
                        local_b,
                        dist,
                        speed.amp_dtype,
                        workers,
                        pin,
                    )
                    val = topk_errors(probs, labels)
                    scheduler.step(val["top1_err"] / 100.0)
                    epoch += 1
                    if cfg.final_anneal_epochs and epoch == cfg.epochs - cfg.final_anneal_epochs:
                        for group in optimizer.param_groups:
                            group["lr"] = max(group["lr"] * cfg.lr_factor, cfg.min_lr)
                    train_loss = epoch_loss[0] / max(epoch_loss[1], 1)
                    record = {
                        "kind": "epoch",
                        "epoch": epoch,
                        "global_step": global_step,
                        "train_loss": train_loss,
                        "val_top1_err": val["top1_err"],
                        "val_top5_err": val["top5_err"],
                        "val_crops": cfg.epoch_eval_crops,
                        "lr": optimizer.param_groups[0]["lr"],
                        "elapsed_s": elapsed_now(),
                    }
                    write(record)
                    history.append(record)
                    self.log(
                        f"epoch {epoch}/{cfg.epochs}: train loss {train_loss:.4f}, val top-1 "
                        f"{val['top1_err']:.2f}% top-5 {val['top5_err']:.2f}%, "
                        f"lr {record['lr']:.1e}"
                    )
                    if epoch in snapshots and dist.is_main:
                        save_checkpoint(
                            self.run_dir / "snapshots" / f"epoch_{epoch:03d}.pt",
                            {
                                "model": model.state_dict(),
                                "epoch": epoch,
                                "model_config": arch_dict(model),
                                "config": cfg.to_dict(),
                            },
                        )
                    step, epoch_loss = 0, [0.0, 0]
                    checkpoint(epoch, 0)
                    last_ckpt, last_ckpt_step = time.perf_counter(), global_step
        finally:
            bar.close()
            if metrics_fh is not None:
                metrics_fh.close()
            if tb is not None:
                tb.close()
        self.model = model
        self.prep = prep
        self.speed = speed
        return TrainResult(
            self.run_dir,
            epoch,
            global_step,
            time.perf_counter() - t_start,
            stopped,
            speed.to_dict(),
            history,
        )

    def _tensorboard(self) -> Any:
        if not self.dist.is_main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard not installed: metrics.jsonl only
            return None
        return SummaryWriter(str(self.run_dir / "tensorboard"))
