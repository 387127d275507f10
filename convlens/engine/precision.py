"""Reduced precision where it is an approximation with a stated error, and only where the
hardware runs it natively.

Two probes use it: occlusion's ``--approx`` (its approximate positions, checked against exact
float32 blocks) and the deconv plugin's ``auto`` rule (``choose_rule``: a cosine-similarity
figure compared with a threshold). Exact results — deconv projections, exact occlusion maps,
linear probes — stay in float32.

* :func:`native_bf16`: a CUDA device with bfloat16, or a CPU whose matrix units take bfloat16
  (AMX tiles or AVX512-BF16, as PyTorch's CPU feature probes report). Elsewhere bfloat16 is
  emulated and slower than float32, so ``auto`` means float32 there;
* :func:`low_precision_copy`: a copy of the model in bfloat16 with channels-last convolution
  weights (the model is untouched), made once
  per model and kept while the model lives and its weights are unchanged (identity and version
  counter of every parameter and buffer).
"""

from __future__ import annotations

import copy
import weakref

import torch
from torch import nn

from convlens.errors import ConvlensError

__all__ = [
    "PRECISIONS",
    "native_bf16",
    "resolve_precision",
    "low_precision_copy",
    "DTYPES",
    "tensor_signature",
    "model_signature",
]

#: What a ``precision`` option accepts.
PRECISIONS = ("auto", "fp32", "bf16")
#: The reduced formats by name.
DTYPES = {"bf16": torch.bfloat16}

_COPIES: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices natively (module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # noqa: BLE001 - a private probe; absent or failing means "no"
            continue
    return False


def resolve_precision(requested: str, device: torch.device | str) -> str:
    """``fp32`` or ``bf16`` for ``requested`` (``auto``: bf16 where it runs natively)."""
    if requested not in PRECISIONS:
        raise ConvlensError(f"precision {requested!r}: choose one of {', '.join(PRECISIONS)}")
    if requested == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return requested


def _version(t: torch.Tensor) -> int:
    try:
        return int(t._version)
    except RuntimeError:  # an inference tensor (made under inference_mode) keeps no counter
        return -1


def tensor_signature(model: nn.Module) -> tuple:
    """The identity, storage address and version counter of every parameter and buffer: it
    changes with any in-place update (an optimiser step, ``load_state_dict``, ``copy_``) or a
    replaced tensor. What per-model caches (this module's copies, occlusion's fixed costs) key
    their validity on."""
    return tuple(
        (id(t), t.data_ptr(), _version(t)) for t in (*model.parameters(), *model.buffers())
    )


def model_signature(model: nn.Module) -> tuple:
    """:func:`tensor_signature` plus every module's training flag: what a cached forward pass
    (``engine.traced_pass``) or occlusion's fixed costs depend on."""
    return tensor_signature(model), tuple(m.training for m in model.modules())


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    t = t.detach()
    if not t.is_floating_point():
        return t.clone()
    if t.dim() == 4:
        return t.to(dtype=dtype, memory_format=torch.channels_last, copy=True)
    return t.to(dtype=dtype, copy=True)


def low_precision_copy(
    model: nn.Module, dtype: torch.dtype = torch.bfloat16, through: str | None = None
) -> nn.Module:
    """A copy of ``model`` in eval mode with its floating-point parameters and buffers in
    ``dtype``, made once per model, dtype, ``through`` and state of its weights (module
    docstring). Raises whatever ``copy.deepcopy`` raises for a model that cannot be copied.

    ``through``: the qualified name of a module the caller runs the copy up to and no further
    (the deconv rule's measurement stops at its layer): only the modules registered up to the end
    of its subtree are cast, the later ones (a classifier head: 89% of vgg16's weights) keep the
    model's own float32 tensors, shared, not copied. Running such a module on the copy fails on
    the mixed types (a ``RuntimeError``), never silently."""
    sig = tensor_signature(model)
    per_model = _COPIES.get(model)
    if per_model is None:
        per_model = _COPIES[model] = {}
    key = (dtype, through or None)
    found = per_model.get(key)
    if found is not None and found[0] == sig:
        return found[1]
    with torch.inference_mode(False), torch.no_grad():
        # the memo hands deepcopy each tensor already cast, so the float32 weights are read once
        # and never copied whole; channels-last: bfloat16 convolutions on oneDNN (AMX) then need
        # no layout reorders (measured 1.6x faster for the deconv rule's projections on vgg16)
        memo: dict[int, torch.Tensor] = {}
        for cast, module in _split(model, through):
            for p in module.parameters(recurse=False):
                if id(p) not in memo:
                    memo[id(p)] = nn.Parameter(_cast(p, dtype), requires_grad=False) if cast else p
            for b in module.buffers(recurse=False):
                if id(b) not in memo:
                    memo[id(b)] = _cast(b, dtype) if cast else b
        low = copy.deepcopy(model, memo)
    low.eval()
    per_model[key] = (sig, low)
    return low


def _split(model: nn.Module, through: str | None):
    """``(cast, module)`` for every module in registration order: cast up to the end of
    ``through``'s subtree (every module when ``through`` is None or empty)."""
    mods = list(model.named_modules(remove_duplicate=True))
    if not through:
        return [(True, m) for _, m in mods]
    names = [n for n, _ in mods]
    if through not in names:
        raise ConvlensError(f"low_precision_copy: no module {through!r} in the model")
    last = max(i for i, n in enumerate(names) if n == through or n.startswith(through + "."))
    return [(i <= last, m) for i, (_, m) in enumerate(mods)]
