"""Tiny deterministic convnets for tests — convlens's own and plugin authors'.

Each is small enough to run in milliseconds on a CPU and is built from a seed, so that a test can
compare against a hand computation. They cover the shapes of network convlens must handle: a
Zeiler & Fergus-style chain (conv → relu → overlapping max-pool → LRN), a ``forward`` written with
functional ops, a module reused at several places, and a residual block with BatchNorm and a
depthwise convolution.
"""

from convlens.testing.models import (
    FunctionalNet,
    ReusedModuleNet,
    TinyChainNet,
    TinyResNet,
    tiny_model,
    tiny_probe_model,
)

__all__ = [
    "TinyChainNet",
    "FunctionalNet",
    "ReusedModuleNet",
    "TinyResNet",
    "tiny_model",
    "tiny_probe_model",
]
