"""A small name → object registry shared by models, probes and recipes.

Overwriting a name warns (never silently), an unknown name raises with the close matches.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from convlens.errors import ConvlensError

T = TypeVar("T")


def close_matches(name: str, candidates: list[str], n: int = 3) -> str:
    """A ``" (did you mean: a, b?)"`` suffix for error messages, or ``""``."""
    found = difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
    if not found:
        lowered = name.lower()
        found = [c for c in candidates if lowered in c.lower()][:n]
    return f" (did you mean: {', '.join(found)}?)" if found else ""


class Registry(Generic[T]):
    """Ordered mapping of names to registered objects, with provenance.

    ``kind`` is used in messages ("probe", "model", "recipe").
    """

    def __init__(self, kind: str, error: type[ConvlensError] = ConvlensError) -> None:
        self.kind = kind
        self._error = error
        self._items: dict[str, T] = {}
        self._sources: dict[str, str] = {}

    def register(self, name: str, obj: T, source: str = "") -> T:
        if not name or not isinstance(name, str):
            raise ConvlensError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if name in self._items and self._items[name] is not obj:
            warnings.warn(
                f"{self.kind} {name!r} from {source or '?'} overrides the one from "
                f"{self._sources.get(name) or '?'}",
                stacklevel=2,
            )
        self._items[name] = obj
        self._sources[name] = source
        return obj

    def decorator(self, name: str | None = None, source: str = "") -> Callable[[T], T]:
        def wrap(obj: T) -> T:
            self.register(name or getattr(obj, "__name__", ""), obj, source)
            return obj

        return wrap

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            hint = close_matches(name, list(self._items))
            raise self._error(f"unknown {self.kind} {name!r}{hint}") from None

    def source(self, name: str) -> str:
        return self._sources.get(name, "")

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def items(self) -> list[tuple[str, T]]:
        return list(self._items.items())
