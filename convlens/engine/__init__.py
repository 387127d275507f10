"""The hook engine: attach to any convnet, record activations, switches, the layer trace and
receptive fields of one forward pass, and always clean up. See ``docs/architecture.md``."""

from convlens.engine.layers import (
    LayerRef,
    depth_layers,
    layer_names,
    resolve_layer,
    resolve_layers,
    top_conv_layer,
    trace_model,
    traced_pass,
    unsaturated,
)
from convlens.engine.receptive import ReceptiveField
from convlens.engine.recorder import LayerCall, PoolSwitch, Recording, record

__all__ = [
    "record",
    "Recording",
    "LayerCall",
    "PoolSwitch",
    "ReceptiveField",
    "LayerRef",
    "resolve_layer",
    "resolve_layers",
    "layer_names",
    "trace_model",
    "traced_pass",
    "top_conv_layer",
    "depth_layers",
    "unsaturated",
]
