"""Deconv probe benchmark: convlens's batched deconvnet vs Captum, mining overhead, mining memory.

    .venv/bin/python benchmarks/deconv.py                       # all three parts
    .venv/bin/python benchmarks/deconv.py --part projection     # 96 projections vs Captum
    .venv/bin/python benchmarks/deconv.py --part mining         # top-k mining vs plain forward
    .venv/bin/python benchmarks/deconv.py --part rss            # peak RSS, 200 vs 2,000 images
    .venv/bin/python benchmarks/deconv.py --part rules          # every rule vs its Captum twin
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/deconv.py     # steadier on a shared machine

1. **projection** — zfnet (Fig. 3, seeded random weights, with its contrast normalisation), the 6
   bundled photos and their mirror images (12 inputs), the top-8 activations of conv5 channels
   0–11 across them (96 activations, mined by convlens). convlens projects all 96 in batched
   passes (``mode="captum", start="one"``: back-propagating through LRN and starting from 1, as
   Captum does); Captum's ``NeuronDeconvolution`` is called once per activation. Both results
   are checked to agree (max |difference| / max |value| <= 1e-5) and the times and their ratio
   printed. Also printed: the paper-form time, and the ``max_unpool2d`` trap — how many pool1
   switches are shared by overlapping windows and how much of a conv5 projection's signal an
   overwriting unpool loses.
2. **mining** — the top-9 of every channel of a layer over 64 images in batches of 16, against a
   plain ``torch.inference_mode()`` forward of the same batches (zfnet conv5 and
   efficientnet_lite0's top conv layer). Mining stops the forward after the layer; the forward
   truncated at the layer is printed too, so the overhead of the bookkeeping itself is visible.
3. **rss** — peak resident memory (``VmHWM``) of a fresh process mining a folder of 200 and of
   2,000 synthetic 48×48 PNGs at 112×112 input (tiny convnet, streaming; holding the 2,000 inputs
   would take 301 MB): memory is bounded by k × channels, not by
   the number of images. Linux only (reads ``/proc/self/status``).

4. **rules** — every backward rule against Captum's per-neuron loop for the same quantity, on two
   models: zfnet conv5 (chain form; the top-8 of channels 0–11 over the 12 inputs, 96
   activations, ``mode="captum"``) and pretrained efficientnet_lite0 ``blocks.5`` (general form;
   the strongest unit of channels 0–7 in each of the 6 photos, 48 activations). ``deconvnet`` vs
   ``NeuronDeconvolution``, ``guided`` vs ``NeuronGuidedBackprop``, ``gradient`` vs
   ``NeuronGradient``; for efficientnet_lite0 Captum runs on a copy whose ``nn.ReLU6`` are
   ``nn.ReLU`` subclasses computing ReLU6 (Captum only hooks ``nn.ReLU``; on that copy its
   deconvolution and guided backprop are the ReLU6-aware rules). Best of 3 timed calls on each
   side; agreement and the ratio printed per rule.

The machine these numbers come from may be shared: times are noisy, ratios within one process are
the meaningful part. Every timed call is preceded by an untimed warm-up.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

warnings.simplefilter("ignore")  # random-weights warnings: this is a timing script


def _now() -> float:
    return time.perf_counter()


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _photos(model) -> torch.Tensor:
    from convlens.data import Preprocess, default_images, load_batch

    x, _ = load_batch(default_images(), Preprocess.for_model(model))
    return torch.cat([x, x.flip(-1)])


# ---------------------------------------------------------------------------------------------
# 1. projections vs Captum
# ---------------------------------------------------------------------------------------------


def _overwrite_projection(model, x, plan, rec, seed) -> torch.Tensor:
    """A naive full-map deconvnet whose unpooling *overwrites* (``F.max_unpool2d``)."""
    from convlens_deconv._chain import _conv_padding

    act = rec[plan.target]
    g = torch.zeros_like(act[:1])
    g[0, seed.channel, seed.y, seed.x] = 1.0
    for step in plan.steps:
        call = step.call
        if step.kind == "rectify":
            g = g.clamp(min=0)
        elif step.kind == "unpool":
            sw = rec.switches[call.name]
            g = F.max_unpool2d(
                g,
                sw.indices[seed.image : seed.image + 1],
                sw.kernel_size,
                sw.stride,
                sw.padding,
                output_size=sw.input_shape[-2:],
            )
        elif step.kind == "conv":
            m = step.module
            ph, pw = _conv_padding(m)
            h, w = call.input_shape[-2:]
            full = F.conv_transpose2d(
                g, m.weight, None, m.stride, (ph, pw), 0, m.groups, m.dilation
            )
            pad = (0, w - full.shape[-1], 0, h - full.shape[-2])
            g = F.pad(full, pad)  # output_padding: the rows/columns stride left out
    return g[0]


def _zfnet_case():
    """Seeded zfnet, the 12 inputs, and the top-8 activations of conv5 channels 0-11 (96)."""
    from convlens_deconv import Seed, mine_topk

    from convlens.models import create_model

    torch.manual_seed(0)
    model = create_model("zfnet").eval()
    x = _photos(model)
    top = mine_topk(model, "conv5", x, channels=range(12), k=8)
    seeds = [Seed(e["image"], e["channel"], e["y"], e["x"]) for e in top.entries()]
    assert len(seeds) == 96, len(seeds)
    return model, x, seeds


def bench_projection() -> None:
    from captum.attr import NeuronDeconvolution
    from convlens_deconv import Seed, choose_method, project

    from convlens.engine import record

    model, x, seeds = _zfnet_case()
    print(
        f"zfnet conv5, {len(x)} images of {tuple(x.shape[1:])}, {len(seeds)} top activations "
        f"(channels 0-11 x top-8), torch threads: {torch.get_num_threads()}"
    )

    # warm-up both sides
    project(model, x, "conv5", seeds[:4], mode="captum", start="one")
    nd = NeuronDeconvolution(model, model.features.relu5)
    nd.attribute(x[:1], neuron_selector=(0, 0, 0))

    t, c = _now(), _cpu()
    ours = project(model, x, "conv5", seeds, mode="captum", start="one")
    t_ours, c_ours = _now() - t, _cpu() - c
    t, c = _now(), _cpu()
    ref = torch.stack(
        [
            nd.attribute(x[s.image : s.image + 1], neuron_selector=(s.channel, s.y, s.x))[0]
            for s in seeds
        ]
    )
    t_cap, c_cap = _now() - t, _cpu() - c
    err = float((ours.projections - ref).abs().max() / ref.abs().max())
    per = (ours.projections - ref).flatten(1).abs().amax(1) / ref.flatten(1).abs().amax(1)
    ok = err <= 1e-5
    t, c = _now(), _cpu()
    project(model, x, "conv5", seeds)
    t_paper, c_paper = _now() - t, _cpu() - c
    print(
        f"  convlens project() [{ours.method}, captum mode]: {t_ours:7.2f} s wall "
        f"({c_ours:.2f} s CPU)"
    )
    print(
        f"  Captum NeuronDeconvolution x {len(seeds)}:     {t_cap:7.2f} s wall "
        f"({c_cap:.2f} s CPU), {t_cap / len(seeds) * 1e3:.0f} ms per activation"
    )
    print(
        f"  ratio (Captum / convlens):                  {t_cap / t_ours:7.2f}x wall, "
        f"{c_cap / c_ours:.2f}x CPU"
    )
    print(
        f"  agreement: max |diff| / max |Captum| = {err:.2e} overall, worst projection "
        f"{float(per.max()):.2e}  -> {'OK' if ok else 'MISMATCH'}"
    )
    print(
        f"  convlens paper form (LRN skipped, from the activation value): {t_paper:.2f} s wall "
        f"({c_paper:.2f} s CPU)"
    )

    # the max_unpool2d trap
    _, plan, _ = choose_method(model, x, "conv5", "paper", "chain")
    with torch.no_grad(), record(model, ["conv5"], switches=True, trace=False) as rec:
        model(x[:1])
    sw = rec.switches["features.pool1"]
    idx = sw.indices.reshape(sw.indices.shape[1], -1)
    shared = sum(
        int((torch.bincount(row, minlength=sw.input_shape[-1] * sw.input_shape[-2])[row] > 1).sum())
        for row in idx
    )
    s0 = next(s for s in seeds if s.image == 0)
    over = _overwrite_projection(model, x, plan, rec, Seed(0, s0.channel, s0.y, s0.x))
    ours1 = project(
        model, x[:1], "conv5", [Seed(0, s0.channel, s0.y, s0.x)], start="one", method="chain"
    ).projections[0]
    lost = 1 - float(over.abs().sum() / ours1.abs().sum())
    print(
        f"  max_unpool2d trap: pool1 of image 0 has {shared:,} of {idx.numel():,} switch "
        f"positions shared by overlapping 3x3/2 windows; overwriting instead of adding loses "
        f"{lost:.0%} of a conv5 projection's L1 signal (channel {s0.channel})"
    )
    if not ok:
        raise SystemExit("projections disagree with Captum")


# ---------------------------------------------------------------------------------------------
# 2. mining overhead
# ---------------------------------------------------------------------------------------------


def _mining_case(
    name: str, layer: str | None, n: int = 64, batch: int = 16, repeats: int = 5
) -> None:
    from convlens_deconv import mine_topk
    from convlens_deconv._forward import recorded_forward
    from convlens_deconv._mining import _candidates, merge_topk

    from convlens.engine import top_conv_layer
    from convlens.models import create_model

    torch.manual_seed(0)
    model = create_model(name).eval()
    layer = layer or top_conv_layer(model)
    base = _photos(model)
    g = torch.Generator().manual_seed(0)
    x = torch.cat([base] * (n // len(base) + 1))[:n] + 0.1 * torch.randn(
        n, *base.shape[1:], generator=g
    )
    batches = [x[i : i + batch] for i in range(0, n, batch)]

    def plain() -> None:
        with torch.inference_mode():
            for xb in batches:
                model(xb)

    def truncated() -> None:
        with torch.inference_mode():
            for xb in batches:
                recorded_forward(model, xb, [layer], layer, switches=False, trace=False)

    def mine() -> None:
        mine_topk(model, layer, x, k=9, batch_size=batch)

    for f in (plain, truncated, mine):  # warm-up
        f()
    wall: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    for _ in range(repeats):  # interleaved repeats, best of each
        for f in (plain, truncated, mine):
            t, c = _now(), _cpu()
            f()
            wall.setdefault(f.__name__, []).append(_now() - t)
            cpu.setdefault(f.__name__, []).append(_cpu() - c)
    w = {k: min(v) for k, v in wall.items()}
    c = {k: min(v) for k, v in cpu.items()}
    # the bookkeeping alone: candidates + merge for every batch, on a recorded activation
    with torch.inference_mode():
        act = recorded_forward(model, batches[0], [layer], layer, switches=False, trace=False)[
            layer
        ]
    chans = list(range(act.shape[1]))
    t = _now()
    best = None
    for i in range(len(batches)):
        cand = _candidates(act[:, chans], list(range(i * batch, (i + 1) * batch)), 1)
        best = merge_topk([best, cand] if best is not None else [cand], 9, act.shape[-1])
    book = _now() - t
    print(
        f"{name} {layer} ({act.shape[1]} channels): {n} images, batch {batch}, best of "
        f"{repeats}: plain forward {w['plain']:.2f} s ({c['plain']:.2f} s CPU), forward stopped "
        f"at the layer {w['truncated']:.2f} s ({c['truncated']:.2f}), top-9 mining of every "
        f"channel {w['mine']:.2f} s ({c['mine']:.2f})"
    )
    print(
        f"  mining / plain forward = {w['mine'] / w['plain']:.3f} wall "
        f"({w['mine'] / w['plain'] - 1:+.1%}), {c['mine'] / c['plain']:.3f} CPU "
        f"({c['mine'] / c['plain'] - 1:+.1%}); the top-k bookkeeping alone: {book * 1e3:.0f} ms "
        f"({book / w['plain']:.1%} of the plain forward)"
    )


def bench_mining() -> None:
    print(f"top-k mining vs plain inference_mode forward, torch threads: {torch.get_num_threads()}")
    _mining_case("zfnet", "conv5")
    _mining_case("efficientnet_lite0", None)


# ---------------------------------------------------------------------------------------------
# 3. memory: 200 vs 2,000 images
# ---------------------------------------------------------------------------------------------

# Peak RSS is read from /proc/self/status (VmHWM, reset by exec): getrusage's ru_maxrss is not
# reset by exec on Linux, so a child would report its parent's peak.
_CHILD = r"""
import sys, warnings
warnings.simplefilter("ignore")
import torch
from convlens.data import Preprocess
from convlens.testing import tiny_model
from convlens_deconv import mine_topk

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

model, _ = tiny_model("chain")
pre = Preprocess(input_size=(112, 112), resize=112)  # 150 KB per input: holding them would show
before = hwm()
top = mine_topk(model, "conv2", sys.argv[1], k=9, preprocess=pre, batch_size=32)
print(top.n_images, before, hwm())
"""


def make_images(folder: Path, n: int, size: int = 48) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"img{i:05d}.png")


def bench_rss() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_images(root / "all", 2000)
        small = root / "small"
        small.mkdir()
        for p in sorted((root / "all").iterdir())[:200]:
            os.link(p, small / p.name)
        rows = {}
        for label, folder in (("200", small), ("2000", root / "all")):
            t = _now()
            out = subprocess.run(
                [sys.executable, "-c", _CHILD, str(folder)],
                capture_output=True,
                text=True,
                check=True,
            )
            n, before, after = (int(v) for v in out.stdout.split())
            rows[label] = (n, before, after, _now() - t)
        for n, before, after, secs in rows.values():
            print(
                f"  {n:5d} images: peak RSS {after / 1024:7.1f} MiB (before mining "
                f"{before / 1024:.1f} MiB, growth {(after - before) / 1024:.1f} MiB), "
                f"{secs:.1f} s incl. start-up"
            )
        ratio = rows["2000"][2] / rows["200"][2]
        print(
            f"  peak RSS 2,000 / 200 images = {ratio:.3f} "
            f"({'within' if abs(ratio - 1) <= 0.10 else 'NOT within'} 10%)"
        )


class _ReLU6AsReLU(torch.nn.ReLU):
    """An ``nn.ReLU`` computing ReLU6, so that Captum's ReLU hooks apply to efficientnet_lite0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(0.0, 6.0)


def _relu6_as_relu(model):
    import copy

    twin = copy.deepcopy(model)
    for parent in list(twin.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.ReLU6):
                setattr(parent, name, _ReLU6AsReLU())
    return twin


REPEATS = 3


def bench_rules() -> None:
    from captum.attr import NeuronDeconvolution, NeuronGradient, NeuronGuidedBackprop
    from convlens_deconv import Seed, layer_activation, project

    from convlens.engine import resolve_layer
    from convlens.models import create_model

    zf, xz, zseeds = _zfnet_case()
    lite = create_model("efficientnet_lite0").eval()
    xl = _photos(lite)[:6]
    act = layer_activation(lite, xl, "blocks.5")
    lseeds = []
    for i in range(xl.shape[0]):
        for c in range(8):
            y, xx = divmod(int(act[i, c].argmax()), act.shape[-1])
            lseeds.append(Seed(i, c, y, xx))
    twin = _relu6_as_relu(lite)
    cases = [
        ("zfnet", zf, zf, xz, "conv5", zseeds, "captum"),
        ("efficientnet_lite0", lite, twin, xl, "blocks.5", lseeds, "paper"),
    ]
    refs = {"deconvnet": NeuronDeconvolution, "guided": NeuronGuidedBackprop,
            "gradient": NeuronGradient}  # fmt: skip
    for label, model, ref_model, x, layer, seeds, mode in cases:
        module = ref_model.get_submodule(resolve_layer(ref_model, layer).name)
        print(f"{label} {layer}: {len(seeds)} activations, threads {torch.get_num_threads()}")
        for rule, cls in refs.items():
            target = model if rule == "gradient" else ref_model
            attr = cls(target, target.get_submodule(resolve_layer(target, layer).name))
            project(model, x, layer, seeds[:2], mode=mode, start="one", rule=rule)  # warm-up
            attr.attribute(x[:1], neuron_selector=(0, 0, 0))
            t_ours = t_cap = float("inf")
            for _ in range(REPEATS):  # best of REPEATS on both sides (a shared machine)
                t = _now()
                ours = project(model, x, layer, seeds, mode=mode, start="one", rule=rule)
                t_ours = min(t_ours, _now() - t)
                t = _now()
                ref = torch.stack([
                    attr.attribute(x[s.image : s.image + 1],
                                   neuron_selector=(s.channel, s.y, s.x))[0]
                    for s in seeds
                ])  # fmt: skip
                t_cap = min(t_cap, _now() - t)
            err = float((ours.projections - ref).abs().max() / ref.abs().max())
            print(
                f"  {rule:9s} [{ours.method:7s}] convlens {t_ours:6.2f} s  Captum "
                f"{cls.__name__} x {len(seeds)} {t_cap:6.2f} s  ratio {t_cap / t_ours:5.1f}x  "
                f"max|diff|/max|Captum| {err:.1e} {'OK' if err <= 1e-5 else 'MISMATCH'}"
            )
        del module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--part", choices=("projection", "mining", "rss", "rules", "all"), default="all"
    )
    args = ap.parse_args()
    print(f"load average: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs (shared machine)")
    if args.part in ("projection", "all"):
        print("== 1. projections: convlens vs Captum NeuronDeconvolution ==")
        bench_projection()
    if args.part in ("mining", "all"):
        print("== 2. top-k mining overhead ==")
        bench_mining()
    if args.part in ("rss", "all"):
        print("== 3. mining memory, streaming a folder ==")
        bench_rss()
    if args.part in ("rules", "all"):
        print("== 4. every backward rule vs its Captum per-neuron loop ==")
        bench_rules()


if __name__ == "__main__":
    main()
