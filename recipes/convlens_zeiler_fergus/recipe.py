"""``convlens recipe zeiler-fergus``: the command, its options, and how they become a
:class:`~.config.TrainConfig`.

    convlens recipe zeiler-fergus                                    # miniature, CPU, < 10 min
    convlens recipe zeiler-fergus --data /data/imagenet --experiment zfnet
    convlens recipe zeiler-fergus --data /data/imagenet --experiment table3
    convlens recipe zeiler-fergus --data /data/imagenet --experiment zfnet --members 5 \\
        --experiment zfnet-wide                                       # Table 2's ensembles
    convlens recipe zeiler-fergus --data /data/imagenet --resume      # after a crash/preemption
    convlens recipe zeiler-fergus --data /data/imagenet --set weight_decay=5e-4 --set epochs=90
    torchrun --standalone --nproc_per_node=8 -m convlens_zeiler_fergus --data /data/imagenet

Precedence: the preset (ImageNet defaults of Section 3, or the miniature's without ``--data``) <
``--config FILE.json`` < ``--set KEY=VALUE`` < the explicit options. Unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from pathlib import Path
from typing import Any, ClassVar

import torch

import convlens
from convlens.errors import ConvlensError
from convlens.io import write_json
from convlens.options import Option, parse_str_list
from convlens_zeiler_fergus.config import ConfigError, TrainConfig
from convlens_zeiler_fergus.experiments import EXPERIMENTS

__all__ = ["ZeilerFergusRecipe", "resolve_config", "run_recipe", "OPTIONS"]

_EXP_CHOICES = (*EXPERIMENTS, "table2", "table3")

OPTIONS: tuple[Option, ...] = (
    Option(
        "data",
        Path,
        None,
        "ImageFolder root with train/ and val/ (ImageNet layout). Omit "
        "for the embedded miniature (generated 12-class set, CPU, minutes).",
    ),
    Option(
        "experiment",
        str,
        None,
        "Experiment(s) to train, repeatable: a Table 2/3 "
        "architecture, 'table2' or 'table3'. Default: zfnet.",
        choices=_EXP_CHOICES,
        multiple=True,
    ),
    Option("epochs", int, None, "Epochs (paper: 70; miniature: 10).", min=1),
    Option("batch_size", int, None, "Global batch size, split over DDP ranks (paper: 128).", min=1),
    Option("lr", float, None, "Initial learning rate (paper: 1e-2).", min=0),
    Option(
        "members",
        int,
        None,
        "Models per experiment (seeds seed, seed+1, ...) for Table 2's ensembles.",
        min=1,
    ),
    Option("resume", bool, False, "Continue from each run's checkpoints/last.pt."),
    Option("fresh", bool, False, "Delete the runs' checkpoints and outputs and start over."),
    Option("workers", int, None, "DataLoader workers per rank (-1: auto).", min=-1),
    Option("compile", bool, False, "torch.compile the model."),
    Option(
        "precision",
        str,
        None,
        "auto (bf16 autocast on CUDA), bf16 or fp32.",
        choices=("auto", "bf16", "fp32"),
    ),
    Option(
        "pack",
        bool,
        False,
        "Read sharded uint8 memmaps of the 256x256 crops (written once; "
        "ImageNet train needs 252 GB).",
    ),
    Option("pack_dir", Path, None, "Where packs live (default: the cache dir)."),
    Option(
        "cache_dir",
        Path,
        None,
        "Mean image and packs (default ~/.cache/convlens/"
        "zeiler-fergus; the miniature uses OUT/cache).",
    ),
    Option(
        "probes",
        str,
        None,
        "Probes to run on the trained model: 'all' (default), 'none' or "
        "a comma list of deconv,occlusion,correspondence,invariance,linear.",
    ),
    Option(
        "probe_option",
        str,
        None,
        "PROBE.KEY=VALUE passed to one probe, repeatable (e.g. "
        "--probe-option linear.data=/data/caltech101).",
        multiple=True,
    ),
    Option(
        "ckpt_minutes", float, None, "Checkpoint every N minutes (and at every epoch end).", min=0
    ),
    Option(
        "ensemble",
        Path,
        None,
        "Only evaluate the ensemble of these trained runs "
        "(repeatable; folders with val_probs.npy).",
        multiple=True,
    ),
    Option("report_only", bool, False, "Only rebuild OUT/report/index.html from the files."),
    Option("config", Path, None, "A JSON file of TrainConfig keys."),
    Option(
        "set",
        str,
        None,
        "KEY=VALUE for any TrainConfig key, repeatable (e.g. --set weight_decay=5e-4).",
        multiple=True,
    ),
    Option("quiet", bool, False, "No diagnostics on stderr."),
)


def _parse_value(key: str, text: str, default: Any) -> Any:
    t = text.strip()
    if t.lower() in ("none", "null") and key in ("data", "pack_dir", "cache_dir"):
        return None
    try:
        if isinstance(default, bool):
            if t.lower() in ("1", "true", "yes", "on"):
                return True
            if t.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(t)
        if isinstance(default, int):
            return int(t)
        if isinstance(default, float):
            return float(t)
        if isinstance(default, tuple):
            parts = [p for p in (s.strip() for s in t.split(",")) if p]
            if default and isinstance(default[0], int):
                return tuple(int(p) for p in parts)
            return tuple(parts)
    except ValueError:
        raise ConfigError(f"--set {key}={text!r}: not a valid {type(default).__name__}") from None
    return t


def _guess(text: str) -> Any:
    t = text.strip()
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    for cast in (int, float):
        try:
            return cast(t)
        except ValueError:
            pass
    return t


def resolve_config(options: dict[str, Any], seed: int = 0) -> TrainConfig:
    """The options of :data:`OPTIONS` (parsed) → the run's :class:`TrainConfig`."""
    data = options.get("data")
    base = TrainConfig() if data is not None else TrainConfig.miniature()
    if options.get("config"):
        path = Path(options["config"])
        try:
            values = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: cannot read a JSON config ({e})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a JSON object of config keys")
        values.pop("schema_version", None)
        base = base.replace(**values)
    defaults = {f.name: getattr(base, f.name) for f in dataclasses.fields(TrainConfig)}
    sets: dict[str, Any] = {}
    for item in options.get("set") or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in defaults:
            base.replace(**{key: None})  # raises with the close matches
        sets[key] = _parse_value(key, value, defaults[key])
    base = base.replace(**sets)
    if options.get("probe_option"):
        popts = {k: dict(v) for k, v in base.probe_options.items()}
        for item in options["probe_option"]:
            head, sep, value = item.partition("=")
            probe, dot, key = head.partition(".")
            if not sep or not dot or not probe.strip() or not key.strip():
                raise ConfigError(f"--probe-option {item!r}: expected PROBE.KEY=VALUE")
            popts.setdefault(probe.strip(), {})[key.strip().replace("-", "_")] = _guess(value)
        base = base.replace(probe_options=popts)
    explicit: dict[str, Any] = {"seed": seed}
    if data is not None:
        explicit["data"] = str(Path(data).expanduser())
    for key in ("epochs", "batch_size", "lr", "members", "workers", "precision", "ckpt_minutes"):
        if options.get(key) is not None:
            explicit[key] = options[key]
    for key in ("pack_dir", "cache_dir"):
        if options.get(key) is not None:
            explicit[key] = str(options[key])
    if options.get("compile"):
        explicit["compile"] = True
    if options.get("pack"):
        explicit["pack"] = True
    probes = options.get("probes")
    if probes is not None:
        p = probes.strip().lower()
        names = (
            () if p == "none" else (base.probes if p == "all" else tuple(parse_str_list(probes)))
        )
        explicit["probes"] = names
    return base.replace(**explicit)


def run_recipe(
    out_dir: Path,
    options: dict[str, Any],
    device: torch.device,
    seed: int = 0,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Everything ``convlens recipe zeiler-fergus`` does (see ``pipeline.py`` for the layout)."""
    from convlens_zeiler_fergus import pipeline
    from convlens_zeiler_fergus.distributed import setup, teardown
    from convlens_zeiler_fergus.evaluate import ensemble
    from convlens_zeiler_fergus.report import build_report

    t0 = time.perf_counter()
    out = Path(out_dir)
    if options.get("report_only"):
        return {"report": str(build_report(out))}
    if options.get("ensemble"):
        runs = [Path(p) for p in options["ensemble"]]
        res = ensemble(runs)
        name = "+".join(p.name for p in runs)
        write_json(out / "ensembles" / f"{name}.json", res)
        return {
            "ensemble": name,
            "members": len(runs),
            "val top-1 err %": res["top1_err"],
            "val top-5 err %": res["top5_err"],
        }
    if options.get("resume") and options.get("fresh"):
        raise ConvlensError("--resume and --fresh contradict each other: choose one")
    cfg = resolve_config(options, seed)
    experiments = pipeline.experiment_list(options.get("experiment") or [])
    if not options.get("resume") and not options.get("fresh"):
        for exp in experiments:  # fail before any work, never overwrite progress
            for run_dir in pipeline.run_dirs(out, exp, cfg.members):
                if (run_dir / "checkpoints" / "last.pt").exists():
                    raise ConvlensError(
                        f"{run_dir / 'checkpoints' / 'last.pt'} exists: pass --resume to "
                        "continue it or --fresh to start over"
                    )
    dist, device = setup(device)
    log = pipeline.Logger(dist, quiet=bool(options.get("quiet")))
    threads = torch.get_num_threads()
    if device.type == "cpu" and cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    try:
        pipeline.check_device_batch(cfg, dist)
        if dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
        cfg, bundle = pipeline.prepare(cfg, out, dist, device, log)
        if dist.is_main:
            write_json(
                out / "recipe.json",
                {
                    "miniature": cfg.is_miniature,
                    "data": cfg.data or f"generated miniature ({out / 'data'})",
                    "experiments": experiments,
                    "members": cfg.members,
                    "input_size": cfg.input_size,
                    "world_size": dist.world_size,
                    "device": str(device),
                    "torch": torch.__version__,
                    "python": platform.python_version(),
                    "convlens": convlens.__version__,
                    "config": cfg.to_dict(),
                    "data_notes": bundle.notes,
                },
            )
        summary: dict[str, Any] = {}
        for exp in experiments:
            for k, run_dir in enumerate(pipeline.run_dirs(out, exp, cfg.members)):
                rcfg = cfg.replace(experiment=exp, seed=cfg.seed + k)
                rec = pipeline.train_and_evaluate(
                    rcfg,
                    run_dir,
                    bundle,
                    dist,
                    device,
                    bool(options.get("resume")),
                    bool(options.get("fresh")),
                    log,
                    progress,
                )
                if rec.get("stopped"):
                    summary["stopped"] = f"{run_dir}: stopped by signal; rerun with --resume"
                    return summary
                label = exp if cfg.members == 1 else f"{exp}/member{k}"
                summary[label] = (
                    f"val top-1 err {rec['val']['top1_err']:.2f} %, top-5 "
                    f"{rec['val']['top5_err']:.2f} % ({rec['val']['crops']} crops)"
                )
        if dist.is_main:
            for i, exp in enumerate(experiments):
                run_dir = pipeline.run_dirs(out, exp, cfg.members)[0]
                pipeline.analyse(
                    cfg.replace(experiment=exp), run_dir, bundle, device, log, with_probes=i == 0
                )
            report = build_report(out, {"wall time": f"{time.perf_counter() - t0:.0f} s"})
            summary["report"] = str(report)
            log(f"report: {report}")
        # no barrier here: the other ranks leave while rank 0 analyses (no collective is used,
        # and a long analysis must not run into the process group's timeout)
        summary["wall time"] = f"{time.perf_counter() - t0:.1f} s"
        return summary if dist.is_main else {}  # one summary per job, from rank 0
    finally:
        torch.set_num_threads(threads)
        teardown(dist)


class ZeilerFergusRecipe(convlens.Recipe):
    """Train ZFNet/AlexNet exactly as Section 3 and reproduce Tables 2-3 with the probes."""

    name: ClassVar[str] = "zeiler-fergus"
    summary: ClassVar[str] = (
        "Train ZFNet/AlexNet as Section 3 and reproduce Tables 2-3 and the "
        "figures (no --data: a CPU miniature in minutes)"
    )
    options = OPTIONS

    def run(self, ctx: convlens.RecipeContext) -> dict[str, Any]:
        return run_recipe(ctx.out_dir, ctx.options, ctx.device, ctx.seed)
