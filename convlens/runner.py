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
import platform
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
    "DEFAULT_MODEL",
]

DEFAULT_MODEL = "efficientnet_lite0"


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
) -> tuple[nn.Module, str]:
    """A model by name (plugin-registered first, then convlens's registry and timm) or as given,
    with ``weights`` loaded, in eval mode on ``device``. Returns ``(model, display name)``."""
    from convlens import models as model_zoo

    if isinstance(name, nn.Module):
        info = getattr(name, "convlens_info", None)
        model, label = name, (getattr(info, "name", None) or type(name).__name__)
        if weights is not None:
            model_zoo.load_weights(model, weights)
    else:
        from convlens.plugins import get_host

        host = host or get_host()
        if name in host.models:
            model = host.models.get(name)()
            if weights is not None:
                model_zoo.load_weights(model, weights)
        else:
            model = model_zoo.create_model(name, weights=weights)
        label = name
    return model.to(resolve_device(device)).eval(), label


def _staged_run(
    probe_cls, opts, net, label, image_paths, weights, out_root, final_dir, main, dev, seed, host,
    progress_factory, images, note_sink,
) -> ProbeResult:  # fmt: skip
    """Run the probe into a staging folder (rank 0) or a throw-away one (other ranks), write its
    section and run.json, and swap the folder in for ``final_dir``."""
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
                "images": [str(p) for p in image_paths],
                "options": json.loads(json.dumps(opts, default=str)),
                "seed": seed,
                "device": str(dev),
                "convlens_version": __version__,
                "torch_version": torch.__version__,
                "python": platform.python_version(),
                "summary": result.summary,
                "files": [final(f) for f in result.files],
            },
        )
        result.files = [Path(final(f)) for f in result.files]
    return result


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
    from convlens.engine import trace_model

    model = ctx.model
    x, paths = _first_images(ctx, 16)
    with torch.inference_mode():
        logits = model(x.to(ctx.device))
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
    rec = trace_model(model, x[:1].to(ctx.device))
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
    **options: Any,
) -> ProbeResult:
    """Run one registered probe and write its files, its report section and the report."""
    from convlens.io import check_writable_dir
    from convlens.plugins import get_host

    host = host or get_host()
    probe_cls = host.probes.get(probe)
    opts = parse_options(probe_cls.options, options)
    fresh = not Path(out).exists()
    check_writable_dir(out)  # before any work: a file in the way or no permission is exit 2
    try:
        return _run_probe(
            probe_cls, opts, model, images, weights, Path(out), device, seed, host,
            progress_factory, overview, note_sink,
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
    overview, note_sink,
) -> ProbeResult:  # fmt: skip
    from convlens.data import default_images

    dev = resolve_device(device)
    seed_everything(seed)
    net, label = load_model(model, weights=weights, device=dev, host=host)
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
            seed, host, progress_factory, images, note_sink,
        )  # fmt: skip
        if main:
            # swapped in: OUT/<probe> now holds exactly this run's files; the overview and the
            # report are rewritten together, under the same lock, so they describe the same runs
            ctx = ProbeContext(net, label, image_paths, final_dir, opts, dev, seed)
            if overview and probe_cls.needs_images:
                write_overview(ctx, out_root)
            build_report(out_root, meta={"model": label})
    return result
