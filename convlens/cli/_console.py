"""The CLI's consoles: results on stdout, diagnostics (warnings, errors, progress) on stderr."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

# Off a terminal (pipes, CI logs, `| cat`) rich would wrap or cut tables at 80 columns: give them
# all the room they need, so no cell is ever truncated there.
out = Console(highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() else 100_000)
err = Console(stderr=True, highlight=False, soft_wrap=True)


_shown: set[str] = set()


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one yellow line on stderr (random weights, skipped images, …), each text once
    per process (the same skipped file seen by two passes is said once)."""
    text = str(message)
    if text in _shown:
        return
    _shown.add(text)
    err.print(f"[bold yellow]warning:[/] {escape(text)}", highlight=False)


def show_note(message: str) -> None:
    """A probe's note (a choice made for the user, and why) as one line on stderr."""
    err.print(f"[bold cyan]note:[/] {escape(str(message))}", highlight=False)


def install_warning_handler() -> None:
    warnings.showwarning = show_warning
    warnings.simplefilter("default")
    # third-party chatter that says nothing about the user's input
    for mod in ("timm", "torch", "captum", "torchvision"):
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=mod)
        warnings.filterwarnings("ignore", category=FutureWarning, module=mod)


class RateColumn(ProgressColumn):
    """Items per second (images/s in a mining pass, projections/s in pass 2)."""

    def render(self, task):  # noqa: ANN001 - rich's Task
        from rich.text import Text

        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.1f}/s", style="progress.data.speed")


def progress_enabled() -> bool:
    return err.is_terminal and not os.environ.get("CONVLENS_NO_PROGRESS")


@contextlib.contextmanager
def progress_bar(description: str, total: int | None) -> Iterator:
    """A rich progress bar on stderr; yields ``advance(n=1)``. Silent when not a terminal."""
    if not progress_enabled():
        yield lambda n=1: None
        return
    columns = [
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=err, transient=False) as prog:
        task = prog.add_task(description, total=total)
        yield lambda n=1: prog.advance(task, n)


def is_debug(argv: list[str] | None = None) -> bool:
    argv = sys.argv if argv is None else argv
    return "--debug" in argv or bool(os.environ.get("CONVLENS_DEBUG"))
