"""The exception hierarchy.

Every error a user can cause (a bad layer name, a missing file, an unreadable image, a plugin that does
not load) is a :class:`ConvlensError`. The CLI turns it into one red line and exit code 2
(``convlens/cli/_errors.py``); library callers catch it like any exception. Messages name the thing
at fault first, so that the one line is enough.
"""

from __future__ import annotations

__all__ = [
    "ConvlensError",
    "LayerNotFoundError",
    "ModelNotFoundError",
    "ImageError",
    "WeightsError",
    "PluginError",
    "NothingCapturedError",
]


class ConvlensError(Exception):
    """Base class of every error convlens raises on purpose (bad input, missing things)."""


class LayerNotFoundError(ConvlensError, KeyError):
    """A layer name or alias that the model does not have (or that never ran)."""

    def __str__(self) -> str:  # KeyError would add quotes around the message
        return str(self.args[0]) if self.args else ""


class ModelNotFoundError(ConvlensError, KeyError):
    """A model name that neither the registry nor timm knows."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ImageError(ConvlensError):
    """An image that cannot be read: missing, not an image, corrupt, or too large."""


class WeightsError(ConvlensError):
    """A weights file that is missing, unsafe to load, or does not fit the model."""


class PluginError(ConvlensError):
    """A plugin that failed to load or misbehaved; other plugins keep working."""


class NothingCapturedError(ConvlensError):
    """A recording asked for layers that did not run during the forward pass."""
