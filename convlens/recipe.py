"""What a recipe is: a long job (training, reproduction) with typed options and ``run(ctx)``.

Recipes register through the ``convlens_register_recipes`` hook and appear as
``convlens recipe NAME``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from convlens.options import Option

__all__ = ["Recipe", "RecipeContext"]


@dataclass
class RecipeContext:
    out_dir: Path
    options: dict[str, Any]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0


class Recipe:
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    options: ClassVar[Sequence[Option]] = ()

    def run(self, ctx: RecipeContext) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError
