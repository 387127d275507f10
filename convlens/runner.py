"""Running probes from Python — the same path the CLI takes.

    import convlens
    result = convlens.run_probe("occlusion", model="resnet18", images=["photos/"], out="out")

``model`` is a name (registry, plugin or timm) or any ``nn.Module``. Results land in
``out/<probe>/`` and ``out/index.html`` is rebuilt. The overview section (the model, its
predictions on the images, its layers and receptive fields) is written next to it.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convlens.errors import ConvlensError
from convlens.io import write_json
from convlens.options import parse_options
from convlens.output import output_lock, staged_dir
from convlens.probe import ProbeContext, ProbeResult, ReportSection, seed_everything
from convlens.render.report import build_report, esc, write_section

__all__ = [
    "run_probe",
    "load_model",
    "resolve_device",
    "write_overview",
    "is_main_process",
    "process_age",
    "DEFAULT_MODEL",
]

DEFAULT_MODEL = "efficientnet_lite0"

_IMPORTED = time.perf_counter()


def process_age() -> tuple[float, str]:
    """``(seconds, since what)``: how long this process has run — since it started where the OS
    says (Linux ``/proc``: start time in clock ticks since boot, against the uptime; 10 ms
    steps), else since this module was imported. For the command, the value read when its model
    is ready is its start-up: interpreter, imports, plugin host and model creation."""
    try:
        with open("/proc/self/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime", encoding="ascii") as fh:
            uptime = float(fh.read().split()[0])
        start = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime
        return max(0.0, uptime - start), "process start"
    except (OSError, ValueError, IndexError, AttributeError):
        return time.perf_counter() - _IMPORTED, "convlens.runner import"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if isinstance(device, torch.device):
        return device
    d = (device or "auto").lower()
    if d == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if d.startswith("cuda") and not torch.cuda.is_available():
        raise ConvlensError(f"device {device!r}: CUDA is not available on this machine")
    try:
        return torch.device(d)
    except RuntimeError:
        raise ConvlensError(f"device {device!r}: expected auto, cpu or cuda[:N]") from None


def load_model(
    name: str | nn.Module,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    host=None,
    *,
    pretrained: bool | None = None,
    num_classes: int | None = None,
    model_args: dict[str, Any] | None = None,
    weights_key: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    input_size: Sequence[int] | int | None = None,
) -> tuple[nn.Module, str]:
    """A model by name (plugin-registered first, then convlens's registry and timm) or as given,
    with ``weights`` loaded, in eval mode on ``device``. Returns ``(model, display name)``.

    ``num_classes`` and ``model_args`` go to the model's factory (a fine-tune's head, any
    constructor argument); ``weights_key`` picks the state dict under that checkpoint key
    (``state_dict_ema``); ``mean``, ``std`` and ``input_size`` (``H``, ``(H, W)`` or
    ``(3, H, W)``) override the preprocessing the model carries. An ``nn.Module`` with no
    preprocessing metadata (no ``convlens_info``, no timm ``pretrained_cfg``) and no override
    gets a :class:`PreprocessAssumedWarning` naming the assumption."""
    from convlens import models as model_zoo

    extra = dict(model_args or {})
    if isinstance(name, nn.Module):
        if num_classes is not None or extra:
            raise ConvlensError(
                "num_classes / model arguments apply to a model built by name, not to an "
                "nn.Module that is already built"
            )
        info = getattr(name, "convlens_info", None)
        model, label = name, (getattr(info, "name", None) or type(name).__name__)
        if weights is not None:
            model_zoo.load_weights(model, weights, key=weights_key)
    else:
        from convlens.plugins import get_host

        host = host or get_host()
        if name in host.models:
            if num_classes is not None:
                extra["num_classes"] = num_classes
            model = host.models.get(name)(**extra)
            if weights is not None:
                model_zoo.load_weights(model, weights, key=weights_key)
        else:
            model = model_zoo.create_model(
                name, weights=weights, pretrained=pretrained, num_classes=num_classes,
                weights_key=weights_key, **extra,
            )  # fmt: skip
        label = name
    _override_preprocess(model, label, mean, std, input_size)
    return model.to(resolve_device(device)).eval(), label


class PreprocessAssumedWarning(UserWarning):
    """A model came with no preprocessing metadata: ImageNet mean/std at 224 px were assumed."""


def _triple(values: Sequence[float] | None, what: str) -> tuple[float, float, float] | None:
    if values is None:
        return None
    v = tuple(float(x) for x in values)
    if len(v) == 1:
        v = v * 3
    if len(v) != 3 or (what == "std" and min(v) <= 0):
        raise ConvlensError(f"--{what} {','.join(map(str, values))}: expected 3 values"
                            + (" > 0" if what == "std" else ""))  # fmt: skip
    return v  # type: ignore[return-value]


def _size(value: Sequence[int] | int | None) -> tuple[int, int, int] | None:
    if value is None:
        return None
    v = (int(value),) if isinstance(value, int) else tuple(int(x) for x in value)
    if len(v) == 1:
        v = (3, v[0], v[0])
    elif len(v) == 2:
        v = (3, *v)
    if len(v) != 3 or v[0] != 3 or min(v[1:]) < 8:
        raise ConvlensError(f"--input-size {value}: expected H, H,W or 3,H,W (>= 8 px)")
    return v  # type: ignore[return-value]


def _override_preprocess(model: nn.Module, label: str, mean, std, input_size) -> None:
    """Apply ``--mean/--std/--input-size`` to the model's ``convlens_info`` (creating one for a
    bare ``nn.Module``); warn when a bare module has neither metadata nor overrides."""
    import dataclasses
    import warnings

    from convlens.models import ModelInfo

    m, s, size = _triple(mean, "mean"), _triple(std, "std"), _size(input_size)
    info = getattr(model, "convlens_info", None)
    if m is None and s is None and size is None:
        if info is None and not getattr(model, "pretrained_cfg", None):
            warnings.warn(
                f"model {label!r} carries no preprocessing (no convlens_info, no timm "
                "pretrained_cfg): assuming ImageNet mean/std at 224 px; pass --mean, --std, "
                "--input-size (mean=, std=, input_size= from Python) if it was trained otherwise",
                PreprocessAssumedWarning,
                stacklevel=3,
            )
        return
    if info is None:
        from convlens.data import Preprocess

        base = Preprocess.for_model(model)
        info = ModelInfo(
            name=label, family="custom", weights="as given", random_init=False,
            num_classes=None, input_size=(3, *base.input_size), mean=tuple(base.mean),
            std=tuple(base.std), interpolation=base.interpolation,
            crop_pct=max(base.input_size) / base.resize,
        )  # fmt: skip
    changes: dict[str, Any] = {}
    if m is not None:
        changes["mean"] = m
    if s is not None:
        changes["std"] = s
    if size is not None:
        changes["input_size"] = size
    model.convlens_info = dataclasses.replace(info, **changes)


def _staged_run(
    probe_cls, opts, net, label, image_paths, weights, out_root, final_dir, main, dev, seed, host,
    progress_factory, images, note_sink, model_kw, timing=None,
) -> ProbeResult:  # fmt: skip
    """Run the probe into a staging folder (rank 0) or a throw-away one (other ranks), write its
    section and run.json, and swap the folder in for ``final_dir``. ``timing``: what run.json
    records of the time before the model was ready (``process_age``); the probe's own seconds are
    added."""
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if main:  # the probe's folder is swapped in only when the run is complete
            work_dir = stack.enter_context(staged_dir(final_dir))
        else:  # other torchrun ranks compute alongside but write nothing shared
            import tempfile

            work_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="convlens-")))
        ctx = ProbeContext(
            model=net,
            model_name=label,
            images=image_paths,
            out_dir=work_dir,
            options=opts,
            device=dev,
            seed=seed,
            probes=host.probes,
            report_dir=out_root,
            progress_factory=progress_factory,
            images_given=bool(images),
            note_sink=note_sink,
        )
        instance = probe_cls()
        result = instance.run(ctx)
        section = instance.render(result, ctx)
        if not main:
            return result
        if section is None:  # no render: the report still shows what the probe found
            section = default_section(probe_cls, result)
        if section is not None:
            write_json(work_dir / "section.json", {"key": probe_cls.name, **section.to_dict()})
        from convlens import __version__
        from convlens.data import Preprocess

        def final(f: str | Path) -> str:
            try:
                return str(final_dir / Path(f).relative_to(work_dir))
            except ValueError:
                return str(f)

        write_json(
            work_dir / "run.json",
            {
                "probe": probe_cls.name,
                "model": label,
                "weights": str(weights)
                if weights
                else getattr(getattr(net, "convlens_info", None), "weights", None),
                **_weights_record(weights, net),
                "weights_key": model_kw["weights_key"],
                "num_classes": model_kw["num_classes"],
                "model_args": json.loads(json.dumps(model_kw["model_args"], default=str)),
                "preprocess": Preprocess.for_model(net).to_dict(),
                "images": [str(p) for p in image_paths],
                "options": json.loads(json.dumps(opts, default=str)),
                "seed": seed,
                "device": str(dev),
                "convlens_version": __version__,
                "torch_version": torch.__version__,
                "python": platform.python_version(),
                "summary": result.summary,
                "files": [final(f) for f in result.files],
                "timing": {**(timing or {}), "probe_s": round(time.perf_counter() - t0, 3)},
            },
        )
        result.files = [Path(final(f)) for f in result.files]
    return result


def _weights_record(weights: str | Path | None, net: nn.Module) -> dict[str, Any]:
    """Where the weights came from and a SHA-256 of their file, when there is one."""
    import hashlib

    tag = str(getattr(getattr(net, "convlens_info", None), "weights", "") or "")
    path: Path | None = Path(weights) if weights is not None else None
    if path is None and tag.startswith("pretrained:efficientnet-lite"):
        from convlens.models.pretrained import lite_weights_path

        path = lite_weights_path(int(tag.split("lite")[1][0]))
    if path is None or not path.is_file():
        sha = tag.split("@sha256:")[1] if "@sha256:" in tag else None
        return {"weights_origin": tag or None, "weights_sha256": sha}
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return {"weights_origin": tag or str(path), "weights_file": str(path),
            "weights_sha256": digest.hexdigest()}  # fmt: skip


def default_section(probe_cls: type, result: ProbeResult) -> ReportSection:
    """The report section of a probe without ``render``: its summary as a table."""
    rows = "".join(
        f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in result.summary.items()
    )
    files = ", ".join(f"<code>{esc(Path(f).name)}</code>" for f in result.files)
    html = (
        f"<p>{esc(probe_cls.summary)}</p>"
        + (f"<table>{rows}</table>" if rows else "<p>No summary.</p>")
        + (f"<p>Files: {files}</p>" if files else "")
    )
    return ReportSection(f"{probe_cls.name}", html, [], order=80)


def _rank() -> int:
    """This process's rank: torch.distributed's when initialised, else torchrun's ``RANK``
    (probes initialise the group inside ``run``), else 0."""
    import os

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0") or 0)


def is_main_process() -> bool:
    """False on ranks other than 0 of an initialised ``torch.distributed`` group (torchrun):
    files shared by all ranks (run.json, the report) are written once, by rank 0."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _first_images(ctx: ProbeContext, limit: int) -> tuple[torch.Tensor, list]:
    """At most ``limit`` images, streamed (a 50k-image folder is not loaded for the overview)."""
    import itertools

    from convlens.data import Preprocess, iter_images

    pre = ctx.preprocess or Preprocess.for_model(ctx.model)
    items = list(itertools.islice(iter_images(ctx.images), limit))
    return torch.stack([pre(img) for _, img in items]), [p for p, _ in items]


def _class_name(model: nn.Module, idx: int) -> str:
    info = getattr(model, "convlens_info", None)
    names = getattr(info, "class_names", None)
    if names and 0 <= idx < len(names):
        return names[idx]
    return f"class {idx}"


def write_overview(ctx: ProbeContext, out_root: Path) -> dict[str, Any]:
    """The core's own report section: the model, its top-5 predictions on the images, and its
    layers with output shapes and receptive fields."""
    from convlens.engine.layers import traced_pass

    model = ctx.model
    x, paths = _first_images(ctx, 16)
    x = x.to(ctx.device)
    # the first image's traced pass gives the layers and its prediction (read back when a probe
    # such as occlusion already ran it on the same image); one more pass predicts the others
    rec, first = traced_pass(model, x[:1])
    with torch.inference_mode():
        logits = torch.cat([first, model(x[1:])]) if x.shape[0] > 1 else first
    preds = []
    if logits.dim() == 2:
        probs = logits.float().softmax(-1).cpu()
        top = probs.topk(min(5, probs.shape[1]), dim=1)
        for i, p in enumerate(paths):
            preds.append(
                {
                    "image": str(p),
                    "top5": [
                        {"class": int(c), "name": _class_name(model, int(c)), "prob": float(v)}
                        for v, c in zip(top.values[i], top.indices[i], strict=True)
                    ],
                }
            )
    layers = [c.to_dict() for c in rec.trace if c.leaf]
    info = getattr(model, "convlens_info", None)
    random_init = bool(getattr(info, "random_init", False))
    data = {
        "model": ctx.model_name,
        "weights": getattr(info, "weights", "unknown"),
        "random_weights": random_init,
        "parameters": sum(p.numel() for p in model.parameters()),
        "input_shape": list(x.shape[1:]),
        "predictions": preds,
        "layers": layers,
    }
    write_json(out_root / "overview" / "overview.json", data)
    rows = "".join(
        f"<tr><td>{esc(Path(p['image']).name)}</td>"
        + "".join(
            f"<td>{esc(t['name'])} <small>{t['prob']:.2f}</small></td>" for t in p["top5"][:3]
        )
        + "</tr>"
        for p in preds
    )
    layer_rows = "".join(
        f"<tr><td>{esc(c['name'])}</td><td>{esc(c['type'])}</td>"
        f"<td>{esc(c['output_shape'])}</td>"
        f"<td>{esc(_rf_text(c['receptive_field']))}</td></tr>"
        for c in layers[:400]
    )
    warn = (
        '<p class="warn">This model has <b>random weights</b>: the figures show the architecture, '
        "not learned features. Pass <code>--weights PATH</code> for a trained model.</p>"
        if random_init
        else ""
    )
    html = (
        f"{warn}<p>Model <b>{esc(ctx.model_name)}</b>, weights <code>{esc(data['weights'])}</code>,"
        f" {data['parameters']:,} parameters, input {esc(tuple(x.shape[1:]))}.</p>"
        + (
            "<h3>Predictions</h3><table><tr><th>image</th><th>top-1</th><th>top-2</th>"
            f"<th>top-3</th></tr>{rows}</table>"
            if preds
            else ""
        )
        + "<details><summary>Layers, output shapes and receptive fields "
        f"({len(layers)})</summary><table><tr><th>layer</th><th>type</th><th>output</th>"
        f"<th>receptive field (size /stride @start)</th></tr>{layer_rows}</table></details>"
    )
    write_section(out_root, "overview", ReportSection("Model overview", html, order=0))
    return data


def _rf_text(rf: dict | None) -> str:
    if not rf:
        return "?"
    if rf["global"]:
        return "global"
    s, st, o = rf["size"], rf["stride"], rf["start"]
    one = lambda v: str(v[0]) if v[0] == v[1] else f"{v[0]}x{v[1]}"  # noqa: E731
    return f"{one(s)} /{one(st)} @{one(o)}"


def run_probe(
    probe: str,
    model: str | nn.Module = DEFAULT_MODEL,
    *,
    images: Sequence[str | Path] | None = None,
    weights: str | Path | None = None,
    out: str | Path = "convlens-out",
    device: str | torch.device = "auto",
    seed: int = 0,
    host=None,
    progress_factory: Callable[..., Any] | None = None,
    overview: bool = True,
    note_sink: Callable[[str], None] | None = None,
    pretrained: bool | None = None,
    num_classes: int | None = None,
    model_args: dict[str, Any] | None = None,
    weights_key: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    input_size: Sequence[int] | int | None = None,
    **options: Any,
) -> ProbeResult:
    """Run one registered probe and write its files, its report section and the report.

    ``num_classes``, ``model_args``, ``weights_key``, ``mean``, ``std``, ``input_size``: how the
    model is built and fed (:func:`load_model`); all recorded in ``run.json``."""
    from convlens.io import check_writable_dir
    from convlens.plugins import get_host

    host = host or get_host()
    probe_cls = host.probes.get(probe)
    opts = parse_options(probe_cls.options, options)
    fresh = not Path(out).exists()
    check_writable_dir(out)  # before any work: a file in the way or no permission is exit 2
    try:
        model_kw = {
            "pretrained": pretrained, "num_classes": num_classes, "model_args": dict(model_args or {}),
            "weights_key": weights_key, "mean": mean, "std": std, "input_size": input_size,
        }  # fmt: skip
        return _run_probe(
            probe_cls, opts, model, images, weights, Path(out), device, seed, host,
            progress_factory, overview, note_sink, model_kw,
        )  # fmt: skip
    except BaseException:
        if fresh:  # a failed first run leaves no folder behind (only its lock file was there)
            from convlens.output import LOCK_NAME

            left = list(Path(out).iterdir()) if Path(out).is_dir() else []
            if all(p.name == LOCK_NAME for p in left):
                for p in left:
                    p.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    Path(out).rmdir()
        raise


def _run_probe(
    probe_cls, opts, model, images, weights, out: Path, device, seed, host, progress_factory,
    overview, note_sink, model_kw,
) -> ProbeResult:  # fmt: skip
    from convlens.data import default_images
    from convlens.render import preload

    dev = resolve_device(device)
    seed_everything(seed)
    preload.start()  # matplotlib's import, for the figures, behind the model's creation
    try:
        net, label = load_model(model, weights=weights, device=dev, host=host, **model_kw)
        # the command's start-up ends with the model; a wait for matplotlib below is the run's
        ready, since = process_age()
    finally:
        preload.wait()  # never two threads importing matplotlib; none left behind
    timing = {"model_ready_s": round(ready, 3), "model_ready_since": since}
    if any(model_kw[k] is not None for k in ("mean", "std", "input_size")) and note_sink:
        from convlens.data import Preprocess

        pp = Preprocess.for_model(net)
        note_sink(f"preprocessing of {label}: resize {pp.resize}, crop {pp.input_size[0]}x"
                  f"{pp.input_size[1]}, mean {pp.mean}, std {pp.std}")  # fmt: skip
    image_paths = [Path(p) for p in images] if images else list(default_images())
    for p in image_paths:
        if not p.exists():
            raise ConvlensError(f"{p}: no such file or folder")
    out_root = Path(out)
    final_dir = out_root / probe_cls.name
    main = _rank() == 0
    with contextlib.ExitStack() as held:
        if main:  # one run per output folder, held until the report is rebuilt
            held.enter_context(output_lock(out_root))
        result = _staged_run(
            probe_cls, opts, net, label, image_paths, weights, out_root, final_dir, main, dev,
            seed, host, progress_factory, images, note_sink, model_kw, timing,
        )  # fmt: skip
        if main:
            # swapped in: OUT/<probe> now holds exactly this run's files; the overview and the
            # report are rewritten together, under the same lock, so they describe the same runs
            ctx = ProbeContext(net, label, image_paths, final_dir, opts, dev, seed)
            if overview and probe_cls.needs_images:
                write_overview(ctx, out_root)
            build_report(out_root, meta={"model": label})
    return result
