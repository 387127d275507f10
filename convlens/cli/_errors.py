"""The one place where errors become exit codes.

A :class:`~convlens.errors.ConvlensError` (bad input) → one red line naming the thing at fault,
exit code 2. Any other exception → one red line with its type, exit code 1. ``--debug`` (or
``CONVLENS_DEBUG=1``) re-raises with the full traceback instead. Locals are never shown.
"""

from __future__ import annotations

import click
import typer
from rich.markup import escape
from typer.core import TyperGroup

from convlens.cli import _console
from convlens.errors import ConvlensError

EXIT_USAGE = 2
EXIT_INTERNAL = 1

# Typer ≥ 0.20 vendors click (its own Exit/Abort/UsageError); older ones use click's. Both pass.
_PASS_THROUGH: tuple[type[BaseException], ...] = (typer.Exit, typer.Abort, typer.TyperException)
try:  # pragma: no cover - depends on the typer version
    import click

    _PASS_THROUGH += (click.exceptions.Exit, click.exceptions.Abort, click.ClickException)
except ImportError:  # pragma: no cover
    pass


class ConvlensGroup(TyperGroup):
    """Root command group: wraps every command's execution with the error policy."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except _PASS_THROUGH as exc:
            if _is_usage_error(exc):  # unknown option, bad value: one line too, exit 2
                sub = getattr(exc, "ctx", None)
                path = sub.command_path if sub is not None else "convlens"
                _console.err.print(
                    f"[bold red]error:[/] {escape(_flat_text(exc.format_message()))} "
                    f"(see '{escape(path)} --help')",
                    highlight=False,
                )
                raise typer.Exit(EXIT_USAGE) from None
            raise
        except ConvlensError as exc:
            if _console.is_debug() or ctx.obj and ctx.obj.get("debug"):
                raise
            _console.err.print(f"[bold red]error:[/] {escape(_flat(exc))}", highlight=False)
            raise typer.Exit(EXIT_USAGE) from None
        except KeyboardInterrupt:
            _console.err.print("[bold red]interrupted[/]")
            raise typer.Exit(130) from None
        except Exception as exc:  # noqa: BLE001 - the last line of defence
            if _console.is_debug() or ctx.obj and ctx.obj.get("debug"):
                raise
            _console.err.print(
                f"[bold red]error:[/] {type(exc).__name__}: {escape(_flat(exc))} "
                "(run with --debug for the traceback)",
                highlight=False,
            )
            raise typer.Exit(EXIT_INTERNAL) from None


def _flat(exc: BaseException) -> str:
    return _flat_text(str(exc))


def _flat_text(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) < 600 else text[:597] + "..."


def _is_usage_error(exc: BaseException) -> bool:
    """click's (or typer's vendored click's) UsageError, whichever is installed."""
    return any(k.__name__ == "UsageError" for k in type(exc).__mro__) and hasattr(
        exc, "format_message"
    )
