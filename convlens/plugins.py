"""The plugin manager: loads every plugin of the ``convlens`` entry-point group and asks each for
the probes, models and recipes it provides.

Host order (as pluggy, pytest and tox do it): add the hookspecs → register the core's own plugin →
load entry points (built-in probes are entry points too) → ``check_pending()`` → call the
registration hooks. A plugin that fails to import, implements an unknown hook, or raises while
registering is recorded with its error (``convlens plugins`` shows it) and left out; everything
else keeps working.

``CONVLENS_DISABLE_PLUGINS=name1,name2`` blocks plugins by entry-point name.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import traceback
import warnings
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pluggy

from convlens import hookspecs
from convlens._registry import Registry
from convlens.errors import ModelNotFoundError, PluginError

__all__ = ["PluginHost", "PluginInfo", "get_host", "ENTRY_POINT_GROUP", "DISABLE_ENV"]

ENTRY_POINT_GROUP = "convlens"
DISABLE_ENV = "CONVLENS_DISABLE_PLUGINS"


@dataclass
class PluginInfo:
    """One plugin as ``convlens plugins`` reports it."""

    name: str
    version: str
    source: str
    hooks: list[str] = field(default_factory=list)
    provides: list[str] = field(default_factory=list)
    error: str | None = None
    blocked: bool = False
    traceback: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and not self.blocked


def _one_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}".rstrip(": ")


class PluginHost:
    """A loaded set of plugins and the registries they filled. Create one per run; nothing is
    global except the cached default returned by :func:`get_host`."""

    def __init__(self, entry_points: bool = True, extra: list[tuple[str, Any]] | None = None):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self.probes: Registry = Registry("probe", PluginError)
        self.models: Registry = Registry("model", ModelNotFoundError)
        self.recipes: Registry = Registry("recipe", PluginError)
        blocked = {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}
        if entry_points:
            self._load_entry_points(blocked)
        for name, obj in extra or []:
            self._register(name, obj, PluginInfo(name, "", "python"))
        self._check_pending()
        self._collect()

    # -- loading -------------------------------------------------------------------------------
    def _load_entry_points(self, blocked: set[str]) -> None:
        eps = sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)
        for ep in eps:
            dist = getattr(ep, "dist", None)
            version = getattr(dist, "version", "") or ""
            source = getattr(dist, "name", "") or ep.value
            info = PluginInfo(ep.name, version, source)
            if ep.name in self.plugins:
                warnings.warn(
                    f"plugin {ep.name!r} from {source} is registered twice; keeping the first",
                    stacklevel=2,
                )
                continue
            if ep.name in blocked:
                info.blocked = True
                self.plugins[ep.name] = info
                continue
            try:
                obj = ep.load()
            except Exception as exc:  # a broken plugin must not break convlens
                info.error = f"failed to load {ep.value}: {_one_line(exc)}"
                self.plugins[ep.name] = info
                continue
            self._register(ep.name, obj, info)

    def _register(self, name: str, obj: Any, info: PluginInfo) -> None:
        try:
            self.pm.register(obj, name=name)
        except Exception as exc:
            info.error = f"failed to register: {_one_line(exc)}"
        self.plugins[name] = info

    def _check_pending(self) -> None:
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            bad = exc.plugin
            name = self.pm.get_name(bad) if bad is not None else None
            if name is None:
                raise PluginError(f"plugin validation failed: {exc}") from exc
            self.plugins[name].error = f"unknown hook: {exc}"
            self.pm.unregister(bad)
            self._check_pending()

    def _collect(self) -> None:
        hooks = {
            "convlens_register_probes": self.probes,
            "convlens_register_models": self.models,
            "convlens_register_recipes": self.recipes,
        }
        for hook_name, registry in hooks.items():
            caller = getattr(self.pm.hook, hook_name)
            for impl in caller.get_hookimpls():
                name = impl.plugin_name
                info = self.plugins.setdefault(name, PluginInfo(name, "", "python"))
                info.hooks.append(hook_name)
                before = set(registry.names())
                scoped = _Scoped(registry, name)
                try:
                    impl.function(registry=scoped)
                except Exception as exc:
                    info.error = f"{hook_name} raised {_one_line(exc)}"
                    info.traceback = traceback.format_exc(limit=5)
                    continue
                info.provides += [
                    f"{registry.kind}:{n}" for n in registry.names() if n not in before
                ]

    # -- queries -------------------------------------------------------------------------------
    def plugin_rows(self) -> list[PluginInfo]:
        return sorted(self.plugins.values(), key=lambda p: p.name)

    def module(self, name: str) -> ModuleType | None:
        obj = self.pm.get_plugin(name)
        return obj if isinstance(obj, ModuleType) else None


class _Scoped:
    """A registry view that records the registering plugin as the source."""

    def __init__(self, registry: Registry, source: str) -> None:
        self._registry = registry
        self._source = source

    def register(self, name: str, obj: Any) -> Any:
        return self._registry.register(name, obj, source=self._source)

    def __getattr__(self, item: str) -> Any:
        return getattr(self._registry, item)


_DEFAULT: PluginHost | None = None


def get_host(refresh: bool = False) -> PluginHost:
    """The process's plugin host, loaded on first use (``refresh=True`` reloads)."""
    global _DEFAULT
    if _DEFAULT is None or refresh:
        _DEFAULT = PluginHost()
    return _DEFAULT
