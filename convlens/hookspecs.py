"""The plugin contract: every hook a convlens plugin may implement.

A plugin is a module (or object) registered under the ``convlens`` entry-point group::

    [project.entry-points.convlens]
    hello = "convlens_hello"

whose functions are marked with :data:`hookimpl`. Built-in probes are registered exactly this way.
All hooks are *registration* hooks: convlens hands the plugin a registry and the plugin adds what it
provides. They are called once per plugin when the plugin host starts, each plugin's call isolated:
one that raises is reported by ``convlens plugins`` and the others keep working. None is
``firstresult``; return values are ignored. Every hook is documented in ``docs/plugins.md``
(a test checks it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    from convlens._registry import Registry

__all__ = ["hookspec", "hookimpl", "PROJECT"]

PROJECT = "convlens"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def convlens_register_probes(registry: Registry) -> None:
    """Add probes: ``registry.register(MyProbe.name, MyProbe)``.

    A probe is a subclass of :class:`convlens.probe.Probe`: a ``name``, a one-line ``summary``,
    typed ``options`` (which become the options of ``convlens probe NAME``), ``run(ctx)`` on the
    engine's records and ``render(result, ctx)`` into figures and a report section.
    """


@hookspec
def convlens_register_models(registry: Registry) -> None:
    """Add model factories: ``registry.register("mynet", factory)``.

    ``factory(**kwargs) -> nn.Module``; the model then works with ``--model mynet`` everywhere.
    Attach ``convlens_aliases`` (alias → module name) to give its layers short names.
    """


@hookspec
def convlens_register_recipes(registry: Registry) -> None:
    """Add recipes: ``registry.register(MyRecipe.name, MyRecipe)``.

    A recipe is a subclass of :class:`convlens.recipe.Recipe` with typed ``options`` and
    ``run(ctx)``; it appears as ``convlens recipe NAME``.
    """
