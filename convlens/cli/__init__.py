"""The ``convlens`` command (typer + rich). One module per command group; errors become exit
codes only in ``_errors.py``."""

from __future__ import annotations

import atexit
import os
import sys
from typing import Annotated

import typer

from convlens.cli import _console
from convlens.cli._errors import ConvlensGroup
from convlens.cli.atlas import atlas
from convlens.cli.demo import demo
from convlens.cli.info import layers, models, plugins, samples
from convlens.cli.probe import probe_app, register_probe_commands
from convlens.cli.recipe import recipe_app, register_recipe_commands

__all__ = ["app", "main", "build_app"]


def _version(value: bool) -> None:
    if value:
        from convlens import __version__

        _console.out.print(f"convlens {__version__}")
        raise typer.Exit()


def build_app() -> typer.Typer:
    """A fresh app with one subcommand per currently registered probe and recipe."""
    app = typer.Typer(
        cls=ConvlensGroup,
        help="Interpretability for any PyTorch convnet (Zeiler & Fergus, ECCV 2014, as a tool).",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
        rich_markup_mode="rich",
    )

    @app.callback()
    def root(
        ctx: typer.Context,
        debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
        version: Annotated[
            bool, typer.Option("--version", callback=_version, is_eager=True)
        ] = False,
    ) -> None:
        ctx.obj = {"debug": debug}

    app.command()(models)
    app.command()(layers)
    app.command()(plugins)
    app.command()(samples)
    app.command()(demo)
    app.command()(atlas)
    probes = typer.Typer(help=probe_app.info.help, no_args_is_help=True)
    register_probe_commands(probes)
    app.add_typer(probes, name="probe")
    recipes = typer.Typer(help=recipe_app.info.help, no_args_is_help=True)
    register_recipe_commands(recipes)
    app.add_typer(recipes, name="recipe")
    return app


#: Options that take several values after one flag (``--images photos/*.jpg``, as a shell glob
#: expands it); the repeated form (``--images a --images b``) works too.
MULTI_VALUE = ("--images", "-i", "--checkpoints")


def expand_multi(argv: list[str]) -> list[str]:
    """``--images a b c`` → ``--images a --images b --images c``: every word after one of
    :data:`MULTI_VALUE` up to the next word starting with ``-`` is another value of it."""
    out: list[str] = []
    flag: str | None = None
    for word in argv:
        if word == "--":
            flag = None
            out.append(word)
        elif word in MULTI_VALUE:
            flag = word
            out.append(word)
        elif flag is not None and not word.startswith("-"):
            if out and out[-1] != flag:
                out.append(flag)
            out.append(word)
        else:
            flag = None
            out.append(word)
    return out


def main(argv: list[str] | None = None) -> None:
    """The ``convlens`` command. Run as the process itself (``argv`` None: the console script,
    ``python -m convlens``) it ends through :func:`_fast_exit`; called with ``argv`` it raises
    ``SystemExit`` as usual."""
    _console.install_warning_handler()
    app = build_app()
    args = expand_multi(list(sys.argv[1:] if argv is None else argv))
    try:
        code = app(args=args, prog_name="convlens", standalone_mode=True) or 0
    except SystemExit as exc:
        code = exc.code
    if argv is None and os.environ.get("CONVLENS_FAST_EXIT", "1") != "0":
        _fast_exit(code)
    sys.exit(code)


def _fast_exit(code: object) -> None:
    """End the process without the interpreter's teardown: run the ``atexit`` handlers (temporary
    folders, multiprocessing, logging), flush the standard streams, then ``os._exit``. The teardown
    skipped is a final garbage collection over every object torch, timm, matplotlib and the
    probes left (1.5–1.9 s on 2 cores after an occlusion run on vgg16, all files long closed).
    ``CONVLENS_FAST_EXIT=0`` restores the ordinary exit."""
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code & 0xFF
    else:  # what ``sys.exit("message")`` does: the message on stderr, status 1
        print(code, file=sys.stderr)
        status = 1
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed or broken pipe: nothing left to save
                pass
        os._exit(status)
