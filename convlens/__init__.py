"""convlens — interpretability for any PyTorch convnet, after Zeiler & Fergus (ECCV 2014).

The public surface::

    from convlens import record, run_probe, load_model, Probe, hookimpl

See ``docs/architecture.md`` for the map of modules.
"""

from convlens.engine import ReceptiveField, Recording, record, trace_model
from convlens.errors import ConvlensError
from convlens.hookspecs import hookimpl
from convlens.options import Option
from convlens.probe import Probe, ProbeContext, ProbeResult, ReportSection
from convlens.recipe import Recipe, RecipeContext
from convlens.runner import load_model, run_probe

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "record",
    "trace_model",
    "Recording",
    "ReceptiveField",
    "run_probe",
    "load_model",
    "Probe",
    "ProbeContext",
    "ProbeResult",
    "ReportSection",
    "Recipe",
    "RecipeContext",
    "Option",
    "hookimpl",
    "ConvlensError",
]
