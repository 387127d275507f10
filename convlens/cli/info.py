"""``convlens models``, ``convlens layers``, ``convlens plugins``, ``convlens samples``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from convlens.cli._console import out
from convlens.runner import DEFAULT_MODEL

DEVICE_HELP = "auto (CUDA if available), cpu, or cuda[:N]"


def models(
    all_timm: Annotated[
        bool, typer.Option("--timm", help="Also list every timm architecture name.")
    ] = False,
) -> None:
    """List the models convlens knows by name (any timm model name works too)."""
    from convlens import models as zoo
    from convlens.plugins import get_host

    table = Table(title="models")
    table.add_column("name")
    table.add_column("source")
    table.add_column("weights")
    for name in zoo.list_models():
        entry = zoo.MODELS.get(name)
        weights = "ImageNet (offline)" if entry.pretrained is not None else "random init"
        table.add_row(name, f"convlens ({entry.family})", weights)
    host = get_host()
    for name in host.models.names():
        table.add_row(name, f"plugin {host.models.source(name)}", "plugin")
    out.print(table)
    if all_timm:
        import timm

        names = timm.list_models()
        out.print(f"{len(names)} timm architectures (random init unless --weights is given):")
        out.print(", ".join(names), soft_wrap=True)
    else:
        out.print("Any timm architecture works by name (convlens models --timm lists them).")


def layers(
    model: Annotated[str, typer.Option("--model", "-m", help="Model name.")] = DEFAULT_MODEL,
    weights: Annotated[
        Path | None, typer.Option("--weights", help=".safetensors or torch checkpoint")
    ] = None,
    all_layers: Annotated[
        bool, typer.Option("--all", help="Show container modules too, not only leaf layers.")
    ] = False,
    size: Annotated[
        int | None, typer.Option("--size", help="Input height/width (default: the model's).")
    ] = None,
    pretrained: Annotated[
        bool, typer.Option("--pretrained", help="timm's pretrained weights, from the HF cache.")
    ] = False,
    num_classes: Annotated[
        int | None,
        typer.Option("--num-classes", min=1, help="Classifier size of a fine-tuned model."),
    ] = None,
    model_arg: Annotated[
        list[str] | None,
        typer.Option("--model-arg", help="KEY=VALUE for the model's factory; repeatable."),
    ] = None,
    weights_key: Annotated[
        str | None,
        typer.Option("--weights-key", help="Checkpoint key holding the weights."),
    ] = None,
) -> None:
    """Table of a model's layers: name, type, output shape, receptive field."""
    import torch

    from convlens.engine import trace_model
    from convlens.options import parse_model_args
    from convlens.runner import load_model

    net, label = load_model(
        model, weights=weights, device="cpu", num_classes=num_classes,
        pretrained=True if pretrained else None,
        model_args=parse_model_args(model_arg or []), weights_key=weights_key,
    )  # fmt: skip
    x = None
    if size is not None:
        info = getattr(net, "convlens_info", None)
        c = (getattr(info, "input_size", None) or (3,))[0]
        x = torch.zeros(1, c, size, size)
    rec = trace_model(net, x)
    aliases = {v: k for k, v in (getattr(net, "convlens_aliases", {}) or {}).items()}
    table = Table(title=f"{label}: input {tuple(rec.input_shape or ())[1:]}")
    for col in ("layer", "alias", "type", "output shape", "RF size", "RF stride", "RF start"):
        table.add_column(col, justify="right" if col.startswith("RF") else "left")
    for call in rec.trace:
        if not (call.leaf or all_layers):
            continue
        rf = call.rf
        if rf is None:
            size_s = stride_s = start_s = "?"
        elif rf.is_global:
            size_s, stride_s, start_s = "global", "-", "-"
        else:
            size_s, stride_s, start_s = (
                _pair_text(rf.size),
                _pair_text(rf.stride),
                _pair_text(rf.start),
            )
        shape = "×".join(str(s) for s in (call.output_shape or ())[1:])
        table.add_row(
            call.name, aliases.get(call.name, ""), call.type, shape, size_s, stride_s, start_s
        )
    out.print(table)


def _pair_text(v: tuple[int, int]) -> str:
    return str(v[0]) if v[0] == v[1] else f"{v[0]}×{v[1]}"


def plugins() -> None:
    """Installed plugins: name, version, source, hooks, what they provide, load errors."""
    from convlens.plugins import get_host

    host = get_host()
    table = Table(title="convlens plugins")
    for col in ("name", "version", "source", "hooks", "provides", "status"):
        table.add_column(col)
    for p in host.plugin_rows():
        status = (
            "[yellow]blocked[/]" if p.blocked else f"[red]error: {p.error}[/]" if p.error else "ok"
        )
        table.add_row(
            p.name,
            p.version or "-",
            p.source,
            "\n".join(h.replace("convlens_", "") for h in p.hooks) or "-",
            "\n".join(p.provides) or "-",
            status,
        )
    out.print(table)
    if not host.plugins:
        out.print("No plugins installed (entry-point group 'convlens').")


def samples() -> None:
    """The bundled sample photos (shipped by scikit-image and scikit-learn)."""
    from convlens.data import list_samples

    table = Table(title="bundled sample photos")
    for col in ("name", "source", "description", "path"):
        table.add_column(col)
    for s in list_samples():
        table.add_row(s.name, s.source, s.description, str(s.path))
    out.print(table)
