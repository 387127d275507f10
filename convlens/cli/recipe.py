"""``convlens recipe NAME …``: one subcommand per registered recipe."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any

import typer

from convlens.cli._console import out
from convlens.cli.probe import _option_param

recipe_app = typer.Typer(help="Run a recipe (training, reproduction).", no_args_is_help=True)


def make_recipe_command(recipe_cls: type) -> Any:
    def command(out_dir: Path, device: str, seed: int, **kwargs: Any) -> None:
        from convlens.options import parse_options
        from convlens.recipe import RecipeContext
        from convlens.runner import resolve_device

        ctx = RecipeContext(
            out_dir=out_dir,
            options=parse_options(recipe_cls.options, kwargs),
            device=resolve_device(device),
            seed=seed,
        )
        summary = recipe_cls().run(ctx) or {}
        for k, v in summary.items():
            out.print(f"{k}: {v}")

    kw = inspect.Parameter.KEYWORD_ONLY
    params = [
        inspect.Parameter(
            "out_dir",
            kw,
            default=Path(f"runs/{recipe_cls.name}"),
            annotation=Annotated[Path, typer.Option("--out", "-o")],
        ),
        inspect.Parameter(
            "device", kw, default="auto", annotation=Annotated[str, typer.Option("--device")]
        ),
        inspect.Parameter("seed", kw, default=0, annotation=Annotated[int, typer.Option("--seed")]),
    ] + [_option_param(o) for o in recipe_cls.options]
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return command


def register_recipe_commands(app: typer.Typer) -> None:
    from convlens.plugins import get_host

    for name, recipe_cls in get_host().recipes.items():
        app.command(name=name, help=recipe_cls.summary)(make_recipe_command(recipe_cls))
