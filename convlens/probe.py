"""What a probe is: the base class every probe (built-in or third-party) subclasses.

A probe binds to a model and images through a :class:`ProbeContext` (the engine, the preprocessing,
the output folder, its parsed options), computes in :meth:`Probe.run`, and turns its result into
figures and a report section in :meth:`Probe.render`. Probes are registered through the
``convlens_register_probes`` hook (``convlens/hookspecs.py``); see ``docs/plugins.md``.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from convlens.options import Option

if TYPE_CHECKING:  # pragma: no cover
    from convlens._registry import Registry

__all__ = ["Probe", "ProbeContext", "ProbeResult", "ReportSection", "seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@dataclass
class ReportSection:
    """A probe's part of the HTML report: a title, an HTML fragment, and the figures it shows
    (paths relative to the report's folder)."""

    title: str
    html: str
    figures: list[str] = field(default_factory=list)
    order: int = 50

    def to_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "html": self.html,
            "figures": self.figures,
            "order": self.order,
        }


@dataclass
class ProbeResult:
    """What :meth:`Probe.run` returns: ``summary`` (JSON-able numbers for the terminal and the
    report), ``files`` written, and ``data`` (anything :meth:`Probe.render` needs)."""

    probe: str
    summary: dict[str, Any] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    data: Any = None


@dataclass
class ProbeContext:
    """Everything a probe runs on. ``out_dir`` is the probe's own folder (``OUT/<probe>``)."""

    model: nn.Module
    model_name: str
    images: list[Path]
    out_dir: Path
    options: dict[str, Any]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    preprocess: Any = None
    probes: Registry | None = None
    report_dir: Path | None = None
    progress_factory: Callable[..., Any] | None = None
    #: False when the user named no images and ``images`` are the bundled sample photos.
    images_given: bool = True
    #: Where :meth:`note` sends a line (the CLI: stderr); None: the ``convlens`` logger.
    note_sink: Callable[[str], None] | None = None
    _inputs: tuple[torch.Tensor, list[Path]] | None = None

    def note(self, message: str) -> None:
        """Tell the person running the probe one line (a choice made for them and why)."""
        if self.note_sink is not None:
            self.note_sink(message)
        else:
            import logging

            logging.getLogger("convlens").info(message)

    def inputs(self) -> tuple[torch.Tensor, list[Path]]:
        """The images, loaded and preprocessed for the model (once): ``([N, 3, H, W], paths)``.

        Files inside a given folder that fail to load are skipped with a warning naming them.
        """
        if self._inputs is None:
            from convlens.data import Preprocess, load_batch

            pre = self.preprocess or Preprocess.for_model(self.model)
            self.preprocess = pre
            x, paths = load_batch(self.images, pre)
            self._inputs = (x, list(paths))
        return self._inputs

    @contextlib.contextmanager
    def progress(self, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
        """``with ctx.progress("mining", total=n) as advance: advance(1)`` — a rich progress bar
        on the terminal (nothing when output is not a terminal)."""
        if self.progress_factory is None:
            yield lambda n=1: None
            return
        with self.progress_factory(description, total) as advance:
            yield advance


class Probe:
    """Base class of probes. Subclasses set the class attributes and implement :meth:`run`.

    ``name``: the command (``convlens probe NAME``); ``summary``: one line for listings;
    ``paper``: the section/figure of Zeiler & Fergus it implements; ``options``: typed options;
    ``needs_images``: whether ``--images`` applies (default: the bundled sample photos).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    options: ClassVar[Sequence[Option]] = ()
    needs_images: ClassVar[bool] = True

    def run(self, ctx: ProbeContext) -> ProbeResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def render(self, result: ProbeResult, ctx: ProbeContext) -> ReportSection | None:
        """Write figures into ``ctx.out_dir`` and return the report section (or None)."""
        return None

    def describe(self, result: ProbeResult) -> list[tuple[str, str]]:
        """Rows (key, value) printed in the terminal after the run; default: the summary."""
        return [(k, _fmt(v)) for k, v in result.summary.items()]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
