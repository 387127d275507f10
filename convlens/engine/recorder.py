"""The recorder: attach to any ``nn.Module``, record one forward pass, always detach.

    with record(model, ["conv5", "features.relu2"]) as rec:
        logits = model(x)
    rec["conv5"]           # activation, a detached copy taken when the layer ran
    rec.switches           # every max-pooling's argmax indices, in execution order
    rec.trace              # every layer call, in execution order, with shapes and receptive fields

What is recorded, for each forward pass of the model (a new pass starts a fresh record):

* **activations** of the requested layers. A layer is a module's qualified name (``features.3``),
  an alias the model defines (``model.convlens_aliases``: ``conv1`` … ``fc7`` for zfnet/alexnet),
  or a functional op's name from the trace (``layer1.0/add``). A module that runs several times
  (one ``nn.ReLU`` reused in a block) is recorded at every call: the first call under its name,
  later ones as ``name:1``, ``name:2`` …; asking for ``name`` records all calls, ``name:1`` only
  that one. Values are copied when the layer returns, so a later in-place op (``ReLU(inplace=True)``)
  cannot overwrite them.
* **switches** (:class:`PoolSwitch`) of every ``max_pool2d``, module or functional — the
  deconvnet's unpooling needs them (Zeiler & Fergus, Section 2.1, Fig. 1).
* the **trace** (:class:`LayerCall`): every module call and every functional layer-like op that runs
  outside a leaf module, with output shape and analytic receptive field, so probes can walk the
  network backwards.

Hooks and the function mode are installed on entry and removed in ``finally``: a model leaves a
recording exactly as it entered, also after an exception.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from convlens.engine.capture import CaptureMode, FieldMap, _arg, _tensors
from convlens.engine.layers import LayerRef, resolve_layers
from convlens.engine.receptive import ReceptiveField
from convlens.errors import LayerNotFoundError, NothingCapturedError

__all__ = ["record", "Recording", "LayerCall", "PoolSwitch"]


@dataclass
class LayerCall:
    """One call of a layer during the recorded forward pass.

    ``name`` is the address used everywhere in convlens (module name, ``name:k`` for the k-th
    repeated call, ``parent/op`` for functional ops). ``kind`` is ``"module"`` or ``"function"``.
    """

    index: int
    name: str
    kind: str
    type: str
    module: str | None
    call: int
    leaf: bool
    depth: int
    parent: str | None
    input_shape: tuple[int, ...] | None = None
    output_shape: tuple[int, ...] | None = None
    rf: ReceptiveField | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "kind": self.kind,
            "type": self.type,
            "module": self.module,
            "call": self.call,
            "leaf": self.leaf,
            "parent": self.parent,
            "input_shape": list(self.input_shape) if self.input_shape else None,
            "output_shape": list(self.output_shape) if self.output_shape else None,
            "receptive_field": self.rf.to_dict() if self.rf else None,
        }


@dataclass
class PoolSwitch:
    """Switches of one max-pooling call: where each pooled maximum came from.

    ``indices`` has the pooled output's shape ``[N, C, Ho, Wo]`` and holds flat positions
    ``y * W + x`` into the pooling input of shape ``input_shape`` (``[N, C, H, W]``), exactly as
    ``F.max_pool2d(..., return_indices=True)`` returns them.
    """

    name: str
    index: int
    indices: torch.Tensor
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    ceil_mode: bool


def _pair(v: Any, default: Any = None) -> tuple[int, int]:
    if v is None or v == () or v == []:
        v = default
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(a) for a in v)
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


def _shape(obj: Any) -> tuple[int, ...] | None:
    ts = _tensors(obj)
    return tuple(ts[0].shape) if ts else None


@dataclass
class Recording:
    """Everything recorded during the most recent forward pass of the model."""

    model: nn.Module
    requested: list[LayerRef]
    activations: dict[str, torch.Tensor] = field(default_factory=dict)
    switches: dict[str, PoolSwitch] = field(default_factory=dict)
    trace: list[LayerCall] = field(default_factory=list)
    input_shape: tuple[int, ...] | None = None
    passes: int = 0

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.activation(name)

    def activation(self, name: str) -> torch.Tensor:
        """The recorded activation of ``name`` (alias, module name or ``name:k``)."""
        key = self._canonical(name)
        if key in self.activations:
            return self.activations[key]
        raise LayerNotFoundError(
            f"layer {name!r} was not recorded (recorded: {', '.join(self.activations) or 'none'})"
        )

    def calls(self, name: str) -> list[torch.Tensor]:
        """All recorded calls of a module, in order (``name``, ``name:1``, …)."""
        base = self._canonical(name)
        out = [self.activations[base]] if base in self.activations else []
        k = 1
        while f"{base}:{k}" in self.activations:
            out.append(self.activations[f"{base}:{k}"])
            k += 1
        return out

    def layer(self, name: str) -> LayerCall:
        """The trace entry of a layer call (alias, module name, ``name:k`` or ``parent/op``)."""
        key = self._canonical(name)
        for call in self.trace:
            if call.name == key:
                return call
        from convlens._registry import close_matches

        hint = close_matches(key, [c.name for c in self.trace])
        raise LayerNotFoundError(f"layer {name!r} did not run in the recorded pass{hint}")

    def rf(self, name: str) -> ReceptiveField | None:
        """Analytic receptive field of a layer's units, in input pixels."""
        return self.layer(name).rf

    def leaves(self) -> list[LayerCall]:
        """Leaf calls (modules without children and functional ops) in execution order."""
        return [c for c in self.trace if c.leaf]

    def _canonical(self, name: str) -> str:
        aliases = getattr(self.model, "convlens_aliases", {}) or {}
        base, sep, call = name.partition(":")
        base = aliases.get(base, base)
        return f"{base}:{call}" if sep and call != "0" else base

    def _reset(self) -> None:
        self.activations = {}
        self.switches = {}
        self.trace = []
        self.input_shape = None


class _Session:
    """The live state of one recording: hooks, module stack, counters."""

    def __init__(
        self,
        model: nn.Module,
        rec: Recording,
        want_trace: bool,
        want_switches: bool,
        want_functional: bool,
        detach: bool,
    ) -> None:
        self.model = model
        self.rec = rec
        self.want_trace = want_trace
        self.want_switches = want_switches
        self.detach = detach
        self.fields = FieldMap() if want_trace else None
        self.names = {m: n for n, m in model.named_modules()}
        self.leaf = {m: len(list(m.children())) == 0 for m in self.names}
        self.stack: list[LayerCall] = []
        self.counts: dict[str, int] = {}
        self.fn_counts: dict[tuple[str, str], int] = {}
        self.pool_counts: dict[str, int] = {}
        self.wanted_all = {r.name for r in rec.requested if r.call is None}
        self.wanted_one = {r.key for r in rec.requested if r.call is not None}
        self.mode = (
            CaptureMode(
                self.fields,
                self._on_function if want_functional else None,
                self._on_switch if want_switches else None,
            )
            if (want_functional or want_switches or want_trace)
            else None
        )

    # -- helpers -------------------------------------------------------------------------------
    def _wanted(self, base: str, key: str) -> bool:
        return base in self.wanted_all or key in self.wanted_one

    def _keep(self, value: Any) -> Any:
        ts = _tensors(value)
        if not ts:
            return None
        t = ts[0]
        return t.detach().clone() if self.detach else t.clone()

    def _start_pass(self, args: tuple) -> None:
        self.rec._reset()
        self.rec.passes += 1
        self.stack.clear()
        self.counts.clear()
        self.fn_counts.clear()
        self.pool_counts.clear()
        if self.fields is not None:
            self.fields.clear()
        for t in _tensors(args):
            if t.dim() >= 4:
                self.rec.input_shape = tuple(t.shape)
                if self.fields is not None:
                    self.fields.input_hw = (int(t.shape[-2]), int(t.shape[-1]))
                    self.fields.set(t, ReceptiveField.identity())
                break

    # -- module hooks --------------------------------------------------------------------------
    def pre_hook(self, module: nn.Module, args: tuple) -> None:
        if module is self.model:
            self._start_pass(args)
        base = self.names.get(module, "?")
        k = self.counts.get(base, 0)
        self.counts[base] = k + 1
        call = LayerCall(
            index=len(self.rec.trace),
            name=base if k == 0 else f"{base}:{k}",
            kind="module",
            type=type(module).__name__,
            module=base,
            call=k,
            leaf=self.leaf.get(module, True),
            depth=len(self.stack),
            parent=self.stack[-1].name if self.stack else None,
            input_shape=_shape(args),
        )
        self.stack.append(call)
        if self.want_trace and module is not self.model:
            self.rec.trace.append(call)

    def post_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not self.stack:
            return
        call = self.stack.pop()
        call.output_shape = _shape(output)
        if self.fields is not None:
            ts = _tensors(output)
            if ts:
                rf = self.fields.get(ts[0])
                if rf is None:
                    # A module whose internals convlens does not see: keep the field of a
                    # same-resolution input rather than lose it.
                    ins = [t for t in _tensors(args) if self.fields.get(t)]
                    if ins and ts[0].dim() >= 4 and ins[0].shape[-2:] == ts[0].shape[-2:]:
                        rf = self.fields.get(ins[0])
                        self.fields.set(ts[0], rf)
                call.rf = rf
        if self._wanted(call.module or "", call.name):
            kept = self._keep(output)
            if kept is not None:
                self.rec.activations[call.name] = kept

    # -- function mode callbacks ---------------------------------------------------------------
    def _inside_leaf(self) -> bool:
        return bool(self.stack) and self.stack[-1].leaf and self.stack[-1].name != ""

    def _on_function(self, name: str, func: Any, args: tuple, kwargs: dict, result: Any) -> None:
        if self._inside_leaf() or not self.stack:
            return
        parent = self.stack[-1]
        pname = parent.module or ""
        k = self.fn_counts.get((pname, name), 0)
        self.fn_counts[(pname, name)] = k + 1
        base = f"{pname}/{name}"
        call = LayerCall(
            index=len(self.rec.trace),
            name=base if k == 0 else f"{base}:{k}",
            kind="function",
            type=name,
            module=None,
            call=k,
            leaf=True,
            depth=len(self.stack),
            parent=parent.name,
            input_shape=_shape(args),
            output_shape=_shape(result),
            rf=self.fields.get(_tensors(result)[0]) if self.fields and _tensors(result) else None,
        )
        if self.want_trace:
            self.rec.trace.append(call)
        if self._wanted(base, call.name):
            kept = self._keep(result)
            if kept is not None:
                self.rec.activations[call.name] = kept

    def _on_switch(self, args: tuple, kwargs: dict, result: Any, indices: torch.Tensor) -> None:
        if not self.stack:  # a pooling run inside the block but outside the model's forward
            return
        x = args[0] if args else kwargs["input"]
        if self._inside_leaf():
            owner = self.stack[-1].name
            k = self.pool_counts.get(owner, 0)
            self.pool_counts[owner] = k + 1
            name = owner if k == 0 else f"{owner}/max_pool2d:{k}"
        else:
            pname = self.stack[-1].module if self.stack else ""
            k = self.fn_counts.get((pname or "", "max_pool2d"), 0)
            base = f"{pname or ''}/max_pool2d"
            name = base if k == 0 else f"{base}:{k}"
        k_size = _pair(_arg(args, kwargs, 1, "kernel_size"))
        out = _tensors(result)[0]
        self.rec.switches[name] = PoolSwitch(
            name=name,
            index=len(self.rec.switches),
            indices=indices.detach(),
            input_shape=tuple(x.shape),
            output_shape=tuple(out.shape),
            kernel_size=k_size,
            stride=_pair(_arg(args, kwargs, 2, "stride", None), k_size),
            padding=_pair(_arg(args, kwargs, 3, "padding", 0)),
            dilation=_pair(_arg(args, kwargs, 4, "dilation", 1)),
            ceil_mode=bool(_arg(args, kwargs, 5, "ceil_mode", False)),
        )


@contextlib.contextmanager
def record(
    model: nn.Module,
    layers: Iterable[str] | str = (),
    *,
    switches: bool = True,
    trace: bool = True,
    functional: bool = True,
    detach: bool = True,
) -> Iterator[Recording]:
    """Record activations, max-pool switches and the layer trace of ``model``'s forward passes.

    ``layers``: names to keep activations of (aliases, module names, ``name:k``, ``parent/op``);
    unknown module names raise :class:`~convlens.errors.LayerNotFoundError` before anything runs.
    ``switches``/``trace``/``functional``: turn off what a probe does not need (a plain
    activation recording with all three off costs two hooks per requested module).
    ``detach=False`` keeps recorded activations in the autograd graph (as clones).

    On leaving the block without an error, every requested layer must have run at least once;
    otherwise :class:`~convlens.errors.NothingCapturedError` names the missing ones.
    """
    if isinstance(layers, str):
        layers = [layers]
    refs = resolve_layers(model, list(layers))
    rec = Recording(model=model, requested=refs)
    session = _Session(model, rec, trace, switches, functional, detach)
    needs_all = trace or functional or switches or any(r.is_function for r in refs)
    if needs_all:
        targets = list(session.names)
    else:
        wanted = {r.name for r in refs}
        targets = [model] + [m for m, n in session.names.items() if n in wanted and m is not model]
    handles: list[Any] = []
    mode_entered = False
    try:
        for m in targets:
            handles.append(m.register_forward_pre_hook(session.pre_hook))
            handles.append(m.register_forward_hook(session.post_hook))
        if session.mode is not None:
            session.mode.__enter__()
            mode_entered = True
        yield rec
    finally:
        if mode_entered:
            session.mode.__exit__(None, None, None)
        for h in handles:
            h.remove()
        # the mode holds the session's bound methods and the session holds the mode: break the
        # cycle, or every recording (its activations) waits for the cyclic garbage collector and
        # a long streaming pass grows in memory batch after batch
        session.mode = None
    missing = [r.name if r.call is None else r.key for r in refs if not _captured(rec, r)]
    if missing:
        if rec.passes == 0:
            raise NothingCapturedError(
                "nothing was recorded: the model was not called inside the record() block"
            )
        from convlens._registry import close_matches

        hint = close_matches(missing[0], [c.name for c in rec.trace]) if rec.trace else ""
        raise NothingCapturedError(
            f"layer {missing[0]!r} did not run in the forward pass{hint}"
            + (f" (also missing: {', '.join(missing[1:])})" if len(missing) > 1 else "")
        )


def _captured(rec: Recording, ref: LayerRef) -> bool:
    if ref.call is None:
        return ref.name in rec.activations
    return ref.key in rec.activations
