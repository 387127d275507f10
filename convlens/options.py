"""Typed options shared by probes and recipes; the CLI turns each into a ``--flag``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convlens.errors import ConvlensError

__all__ = [
    "Option",
    "parse_options",
    "parse_int_list",
    "parse_str_list",
    "parse_model_args",
    "parse_numbers",
]

_TYPES = (int, float, str, bool, Path)


@dataclass(frozen=True)
class Option:
    """One option. ``name`` is a Python identifier (``top_k``; the flag is ``--top-k``).

    ``type`` is one of ``int, float, str, bool, Path``; ``multiple=True`` accepts the flag several
    times (and a value list from Python). ``choices`` restricts a ``str``. ``min``/``max`` bound a
    number (inclusive): a value outside is a one-line error naming the flag — never silently
    replaced by the default (a default of ``None`` is written as ``None``, not as ``0``).
    """

    name: str
    type: type = str
    default: Any = None
    help: str = ""
    choices: tuple[str, ...] | None = None
    multiple: bool = False
    min: float | None = None
    max: float | None = None

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ConvlensError(f"option name {self.name!r} is not a Python identifier")
        if self.type not in _TYPES:
            raise ConvlensError(
                f"option {self.name!r}: type must be one of int/float/str/bool/Path"
            )

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def convert(self, value: Any) -> Any:
        if value is None:
            return [] if self.multiple and self.default is None else value
        if self.multiple:
            values = value if isinstance(value, (list, tuple)) else [value]
            return [self._one(v) for v in values]
        return self._one(value)

    def _one(self, value: Any) -> Any:
        try:
            v = self.type(value) if not isinstance(value, self.type) else value
        except (TypeError, ValueError):
            raise ConvlensError(
                f"option {self.flag}: {value!r} is not a valid {self.type.__name__}"
            ) from None
        if self.choices and v not in self.choices:
            raise ConvlensError(
                f"option {self.flag}: {v!r} is not one of {', '.join(self.choices)}"
            )
        if self.min is not None and v < self.min:
            raise ConvlensError(f"option {self.flag}: {v} is below its minimum {self.min:g}")
        if self.max is not None and v > self.max:
            raise ConvlensError(f"option {self.flag}: {v} is above its maximum {self.max:g}")
        return v


def parse_options(options: Sequence[Option], given: dict[str, Any]) -> dict[str, Any]:
    """Defaults filled in, values converted; an unknown key is an error (never ignored)."""
    known = {o.name: o for o in options}
    unknown = sorted(set(given) - set(known))
    if unknown:
        from convlens._registry import close_matches

        raise ConvlensError(
            f"unknown option {unknown[0]!r}{close_matches(unknown[0], list(known))}"
        )
    out = {}
    for o in options:
        out[o.name] = o.convert(given[o.name]) if o.name in given else o.convert(o.default)
    return out


def parse_int_list(text: str | Sequence[int] | None, what: str = "value") -> list[int] | None:
    """``"0-3,7"`` → ``[0, 1, 2, 3, 7]``; ``"all"``/None → None."""
    if text is None or (isinstance(text, str) and text.strip().lower() in ("", "all")):
        return None
    if not isinstance(text, str):
        return [int(v) for v in text]
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                a, b = part.split("-", 1) if not part.startswith("-") else (part, part)
                out.extend(range(int(a), int(b) + 1))
            elif part:
                out.append(int(part))
        except ValueError:
            raise ConvlensError(
                f"{what} {text!r}: expected numbers like '0-15,20' or 'all'"
            ) from None
    return out


def parse_str_list(text: str | Sequence[str] | None) -> list[str]:
    """``"conv5, fc7"`` → ``["conv5", "fc7"]``."""
    if text is None:
        return []
    if not isinstance(text, str):
        return [str(t) for t in text]
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_numbers(text: str | None, flag: str, kind: type = float) -> list | None:
    """``"0.5,0.5,0.5"`` → ``[0.5, 0.5, 0.5]`` (``kind`` int or float); None stays None."""
    if text is None:
        return None
    try:
        return [kind(v) for v in str(text).replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise ConvlensError(f"{flag} {text!r}: expected comma-separated numbers") from None


def parse_model_args(items: Sequence[str]) -> dict[str, Any]:
    """``["depth=18", "drop_rate=0.1", "pretrained=false", "name=x"]`` → typed kwargs: JSON
    values (numbers, ``true``/``false``/``null``, lists), Python's ``True``/``False``/``None``,
    anything else a string. A repeated key or an item without ``=`` is an error."""
    import json

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = str(item).partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ConvlensError(f"--model-arg {item!r}: expected KEY=VALUE with KEY a name")
        if key in out:
            raise ConvlensError(f"--model-arg {key!r} given twice")
        raw = raw.strip()
        py = {"True": True, "False": False, "None": None}
        if raw in py:
            value: Any = py[raw]
        else:
            try:
                value = json.loads(raw)
            except ValueError:
                value = raw
        out[key] = value
    return out
