"""``convlens probe NAME …``: one subcommand per registered probe, options from the plugin."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from convlens.cli._console import out, progress_bar, show_note
from convlens.options import Option
from convlens.runner import DEFAULT_MODEL

probe_app = typer.Typer(
    help="Run a probe on a model and images (built-in or from a plugin).",
    no_args_is_help=True,
)


def _common_params() -> list[inspect.Parameter]:
    kw = inspect.Parameter.KEYWORD_ONLY
    return [
        inspect.Parameter(
            "model",
            kw,
            default=DEFAULT_MODEL,
            annotation=Annotated[
                str,
                typer.Option(
                    "--model", "-m", help="Model name (convlens, plugin or any timm architecture)."
                ),
            ],
        ),
        inspect.Parameter(
            "weights",
            kw,
            default=None,
            annotation=Annotated[
                Path | None,
                typer.Option(
                    "--weights", help="Weights: .safetensors or a torch checkpoint (weights_only)."
                ),
            ],
        ),
        inspect.Parameter(
            "images",
            kw,
            default=None,
            annotation=Annotated[
                list[Path] | None,
                typer.Option(
                    "--images",
                    "-i",
                    help="Image files or folders (recursive); repeatable. "
                    "Default: the bundled sample photos.",
                ),
            ],
        ),
        inspect.Parameter(
            "out",
            kw,
            default=Path("convlens-out"),
            annotation=Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
        ),
        inspect.Parameter(
            "device",
            kw,
            default="auto",
            annotation=Annotated[str, typer.Option("--device", help="auto, cpu or cuda[:N].")],
        ),
        inspect.Parameter(
            "seed",
            kw,
            default=0,
            annotation=Annotated[int, typer.Option("--seed", help="Random seed (recorded).")],
        ),
        *model_params(),
    ]


def model_params() -> list[inspect.Parameter]:
    """How the model is built and fed: shared by every probe and ``convlens layers``."""
    kw = inspect.Parameter.KEYWORD_ONLY
    opt = typer.Option
    return [
        inspect.Parameter("pretrained", kw, default=False, annotation=Annotated[
            bool, opt("--pretrained", help="timm's pretrained weights, from the Hugging Face "
                      "cache (tags such as resnet50.a1_in1k and hf-hub: names imply it).")]),
        inspect.Parameter("num_classes", kw, default=None, annotation=Annotated[
            int | None, opt("--num-classes", min=1,
                            help="Classifier size of a fine-tuned model (e.g. 10).")]),
        inspect.Parameter("model_arg", kw, default=None, annotation=Annotated[
            list[str] | None, opt("--model-arg", help="KEY=VALUE for the model's factory "
                                  "(typed: 3, 0.5, true, [1,2], text); repeatable.")]),
        inspect.Parameter("weights_key", kw, default=None, annotation=Annotated[
            str | None, opt("--weights-key", help="Checkpoint key holding the weights, e.g. "
                            "state_dict_ema.")]),
        inspect.Parameter("mean", kw, default=None, annotation=Annotated[
            str | None, opt("--mean", help="Normalisation mean, 3 values (0-1 RGB): "
                            "0.485,0.456,0.406.")]),
        inspect.Parameter("std", kw, default=None, annotation=Annotated[
            str | None, opt("--std", help="Normalisation std, 3 values.")]),
        inspect.Parameter("input_size", kw, default=None, annotation=Annotated[
            str | None, opt("--input-size", help="Input crop: H, H,W or 3,H,W (pixels).")]),
    ]  # fmt: skip


def model_kwargs(base: dict[str, Any]) -> dict[str, Any]:
    """The CLI's model options as ``load_model`` / ``run_probe`` keyword arguments."""
    from convlens.options import parse_model_args, parse_numbers

    return {
        "pretrained": True if base.pop("pretrained", False) else None,
        "num_classes": base.pop("num_classes", None),
        "model_args": parse_model_args(base.pop("model_arg", None) or []),
        "weights_key": base.pop("weights_key", None),
        "mean": parse_numbers(base.pop("mean", None), "--mean", float),
        "std": parse_numbers(base.pop("std", None), "--std", float),
        "input_size": parse_numbers(base.pop("input_size", None), "--input-size", int),
    }


def _option_param(opt: Option) -> inspect.Parameter:
    typ: Any = opt.type
    if opt.multiple:
        typ = list[opt.type] | None
    elif opt.default is None and opt.type is not bool:
        typ = opt.type | None
    help_text = opt.help + (f" One of: {', '.join(opt.choices)}." if opt.choices else "")
    decl = opt.flag if opt.type is not bool else f"{opt.flag}/--no-{opt.flag[2:]}"
    return inspect.Parameter(
        opt.name,
        inspect.Parameter.KEYWORD_ONLY,
        default=opt.default,
        annotation=Annotated[typ, typer.Option(decl, help=help_text)],
    )


def make_probe_command(probe_cls: type) -> Any:
    common = {p.name for p in _common_params()}
    clash = [o.name for o in probe_cls.options if o.name in common]
    if clash:
        from convlens.errors import PluginError

        raise PluginError(
            f"probe {probe_cls.name!r}: option {clash[0]!r} clashes with a common one"
        )

    def command(**kwargs: Any) -> None:
        from convlens.runner import run_probe

        base = {k: kwargs.pop(k) for k in list(kwargs) if k in common}
        mkw = model_kwargs(base)
        result = run_probe(
            probe_cls.name,
            progress_factory=progress_bar,
            note_sink=show_note,
            **base,
            **mkw,
            **kwargs,
        )
        table = Table(title=f"probe {probe_cls.name}", show_header=False)
        table.add_column("key")
        table.add_column("value")
        for k, v in probe_cls().describe(result):
            table.add_row(k, v)
        out.print(table)
        out.print(f"results: {Path(base['out']) / probe_cls.name}")
        out.print(f"report:  {Path(base['out']) / 'index.html'}")

    command.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        # a probe that reads no images (e.g. linear: labelled sets via --data) has no --images:
        # typer then rejects it as an unknown option instead of silently ignoring it
        [p for p in _common_params() if probe_cls.needs_images or p.name != "images"]
        + [_option_param(o) for o in probe_cls.options]
    )
    command.__name__ = f"probe_{probe_cls.name}"
    return command


def register_probe_commands(app: typer.Typer) -> None:
    from convlens.plugins import get_host

    host = get_host()
    for name, probe_cls in host.probes.items():
        doc = probe_cls.summary + (f" ({probe_cls.paper})" if probe_cls.paper else "")
        app.command(name=name, help=doc, short_help=probe_cls.summary)(
            make_probe_command(probe_cls)
        )
