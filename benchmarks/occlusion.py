"""Occlusion sensitivity: convlens (incremental inference) vs Captum ``Occlusion``, side by side.

    .venv/bin/python benchmarks/occlusion.py                          # zfnet, vgg16, resnet18
    .venv/bin/python benchmarks/occlusion.py --models zfnet,resnet18,efficientnet_lite0
    .venv/bin/python benchmarks/occlusion.py --models vgg16 --size 112 --window 16 --stride 4
    .venv/bin/python benchmarks/occlusion.py --models zfnet --with-batched   # split the gain

For each model, in one process, on the same preprocessed image (the bundled coffee photo), window,
stride, fill (the dataset mean) and target class (the unoccluded top-1): convlens's
``occlusion_maps`` (default ``method="auto"``: incremental inference where the graph allows it) and
Captum's ``Occlusion(...).attribute(..., perturbations_per_eval=64)`` on the softmax probability.
Both produce the same map: Captum's attribution of a pixel is the mean, over the squares covering
it, of ``p(original) − p(occluded)``; the script rebuilds that from convlens's ``prob_target`` and
prints the largest difference relative to the largest attribution and to the unoccluded
probability (random-weight models have attributions near float32 rounding: then the second
number is the meaningful one). Times are wall-clock seconds of
each full call (model tracing and the unoccluded pass included for convlens); ``--with-batched``
also times convlens's batched path (no incremental inference), which separates what channels-last
memory and batching give from what computing less gives; with ``--repeats``
the two alternate and the best time of each is kept. The machine may be shared: timings are noisy,
the ratio of two runs in one process less so.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
from convlens_occlusion import occlusion_maps

from convlens.data import Preprocess, load_batch, sample
from convlens.models import create_model


def captum_map(model, x, window, stride, target, ppe):
    from captum.attr import Occlusion

    def prob(inp):
        return model(inp).softmax(1)

    occ = Occlusion(prob)
    return occ.attribute(
        x,
        sliding_window_shapes=(3, window, window),
        strides=(3, stride, stride),
        baselines=0.0,
        target=target,
        perturbations_per_eval=ppe,
    )


def attribution_from_map(result, p_orig: float) -> np.ndarray:
    """Captum's attribution rebuilt from convlens's map: per pixel, the mean over the squares
    covering it of ``p_orig − p_occluded``."""
    grid = result.grid
    total = np.zeros((grid.height, grid.width))
    count = np.zeros((grid.height, grid.width))
    drops = p_orig - result.prob_target[0].astype(np.float64).reshape(-1)
    for (x0, y0, x1, y1), d in zip(grid.boxes(), drops, strict=True):
        total[y0:y1, x0:x1] += d
        count[y0:y1, x0:x1] += 1
    return np.divide(total, count, out=np.zeros_like(total), where=count > 0)


def bench(
    name: str,
    size: int | None,
    window: int | None,
    stride: int | None,
    repeats: int,
    ppe: int,
    method: str,
    with_batched: bool = False,
    with_approx: bool = False,
    device: str = "cpu",
    approx_precision: str = "auto",
) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = create_model(name).to(device)
    pre = Preprocess.for_model(model)
    if size is not None:
        pre = Preprocess(
            input_size=(size, size),
            resize=int(size / 0.875),
            mean=pre.mean,
            std=pre.std,
            interpolation=pre.interpolation,
        )
    x, _ = load_batch([sample("coffee").path], pre)
    x = x.to(device)
    h = x.shape[-1]
    window = window or max(1, round(32 * h / 224))
    stride = stride or max(1, round(8 * h / 224))
    with torch.inference_mode():
        logits = model(x)
    target = int(logits.argmax(1))
    p_orig = float(logits.double().softmax(1)[0, target])
    t_ours, t_captum, t_batched, t_approx = [], [], [], []
    approx = None
    ours = attr = None
    for _ in range(repeats):
        if with_batched:  # convlens without incremental inference: what layout alone gives
            t = time.perf_counter()
            occlusion_maps(model, x, window=window, stride=stride, fill=0.0, target=target,
                           method="batched")  # fmt: skip
            t_batched.append(time.perf_counter() - t)
        t = time.perf_counter()
        ours = occlusion_maps(
            model, x, window=window, stride=stride, fill=0.0, target=target, method=method
        )
        t_ours.append(time.perf_counter() - t)
        if with_approx:  # adaptive drill-down, its SSIM checked below against the exact map
            # after the exact call: the model's fixed costs (default layer, trace, check of the
            # graph) are cached for it, so compare the sweeps too (``sweep`` phases)
            t = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                approx = occlusion_maps(model, x, window=window, stride=stride, fill=0.0,
                                        target=target, approx=True,
                                        approx_precision=approx_precision)  # fmt: skip
            t_approx.append(time.perf_counter() - t)
        t = time.perf_counter()
        with torch.no_grad():
            attr = captum_map(model, x, window, stride, target, ppe)
            if x.is_cuda:
                torch.cuda.synchronize()
        t_captum.append(time.perf_counter() - t)
    rebuilt = attribution_from_map(ours, p_orig)
    ref = attr[0, 0].double().cpu().numpy()  # the same on all three channels
    diff = float(np.abs(rebuilt - ref).max())
    err = diff / max(np.abs(ref).max(), 1e-30)  # relative to the largest attribution
    err_p = diff / p_orig  # in units of the unoccluded probability
    patch = [r["node"] for r in ours.path["layers"] if r["mode"] == "patch"]
    approx_ssim = approx_check = approx_rec = None
    if approx is not None:
        from skimage.metrics import structural_similarity

        ex = ours.prob_target[0].astype(np.float64)
        approx_ssim = float(structural_similarity(
            approx.prob_target[0].astype(np.float64), ex, win_size=7,
            data_range=float(ex.max() - ex.min()) or 1.0,
        ))  # fmt: skip
        approx_check = approx.path["approx"]["per_image"][0]["check"]["ssim"]
        approx_rec = dict(approx.path["approx"]["per_image"][0])
        approx_rec["sweep_s"] = approx.phases.get("sweep")
        approx_rec["exact_sweep_s"] = ours.phases.get("sweep")
    return {
        "model": name,
        "input": h,
        "window": window,
        "stride": stride,
        "positions": len(ours.grid),
        "convlens_s": min(t_ours),
        "captum_s": min(t_captum),
        "ratio": min(t_captum) / min(t_ours),
        "batched_s": min(t_batched) if t_batched else None,
        "map_err": err,
        "map_err_p": err_p,
        "max_attr": float(np.abs(ref).max()),
        "path": ours.path["method"],
        "patch_layers": patch,
        "flops": ours.path.get("flops"),
        "approx_s": min(t_approx) if t_approx else None,
        "approx_ssim": approx_ssim,
        "approx_check_ssim": approx_check,
        "approx_record": approx_rec,
    }


_STARTUP = """
import time, warnings
t0 = time.perf_counter()
import convlens.cli  # noqa: F401  (what `python -m convlens` imports)
from convlens.plugins import get_host
from convlens.runner import load_model
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    host = get_host()
    load_model({model!r}, host=host)
import os, sys
sys.stdout.flush()
os._exit(0)  # as the command ends (``convlens.cli._fast_exit``): no interpreter teardown
"""


def cli_bench(name: str, window: int, stride: int, target: int, ppe: int, repeats: int) -> dict:
    """The CLI comparison of issue #16: ``convlens probe occlusion`` as a subprocess (wall clock,
    minus its start-up: interpreter, imports, plugin host and model creation) against Captum's
    ``Occlusion.attribute`` in this process, on the same image (the bundled coffee photo),
    square, stride and target. The start-up subtracted is the run's own (``run.json``
    ``timing.model_ready_s``: from the process's start until its model was ready; a wait for
    matplotlib's background import after that counts as work); as a cross-check, also
    the median of a separate subprocess that does only the start-up and ends as the command
    does (noisier: two processes, two start-ups).

    Each repeat runs, in turn: the start-up; a *first* CLI run (a new, empty convlens cache
    folder: panel (c)'s deconv rule is measured, as for weights never seen before); a *later*
    run (the same cache: the rule is read back); Captum. Medians and minima of each are kept
    (the machine may be shared: compare the ratios)."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    from convlens.data import sample

    image = str(sample("coffee").path)
    cmd = [sys.executable, "-m", "convlens", "probe", "occlusion", "--model", name, "--images",
           image, "--window", str(window), "--stride", str(stride), "--target", str(target)]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = create_model(name)
    x, _ = load_batch([sample("coffee").path], Preprocess.for_model(model))
    t = {"startup": [], "first": [], "later": [], "captum": []}
    own = {"first": [], "later": []}  # wall minus the run's own start-up (run.json timing)
    phases: dict[str, dict] = {}
    meta: dict = {}

    def cli(env: dict, kind: str) -> None:
        nonlocal meta
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            subprocess.run([*cmd, "--out", out], env=env, check=True, stdout=subprocess.DEVNULL)
            t[kind].append(time.perf_counter() - t0)
            with open(os.path.join(out, "occlusion", "occlusion.json"), encoding="utf-8") as fh:
                meta = json.load(fh)
            with open(os.path.join(out, "occlusion", "run.json"), encoding="utf-8") as fh:
                own[kind].append(t[kind][-1] - json.load(fh)["timing"]["model_ready_s"])
        if own[kind][-1] == min(own[kind]):
            phases[kind] = meta["phases"]

    for _ in range(repeats):
        cache = tempfile.mkdtemp(prefix="convlens-bench-cache-")
        env = dict(os.environ, CONVLENS_NO_PROGRESS="1", PYTHONWARNINGS="ignore",
                   CONVLENS_CACHE=cache)  # fmt: skip
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", _STARTUP.format(model=name)], env=env, check=True)
        t["startup"].append(time.perf_counter() - t0)
        cli(env, "first")
        cli(env, "later")
        shutil.rmtree(cache, ignore_errors=True)
        t0 = time.perf_counter()
        with torch.no_grad():
            captum_map(model, x, window, stride, target, ppe)
        t["captum"].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in t.items()}
    low = {k: min(v) for k, v in t.items()}
    # the work of a run: its wall clock minus its own start-up (process start to model ready,
    # from run.json), and, as a cross-check, minus the separate start-up subprocess
    work = {k: {"median": float(np.median(own[k])), "min": min(own[k]),
                "median_separate": med[k] - med["startup"], "min_separate": low[k] - low["startup"]}
            for k in ("first", "later")}  # fmt: skip
    return {
        "model": name,
        "window": window,
        "stride": stride,
        "positions": meta["grid"]["rows"] * meta["grid"]["cols"],
        "repeats": repeats,
        "times": t,
        "work_own": own,
        # each repeat's Captum over that repeat's CLI work: the machine's drift between repeats
        # cancels out of each pair
        "paired": {k: [c / w for c, w in zip(t["captum"], own[k], strict=True)] for k in own},
        "startup_s": med["startup"],
        "captum_s": med["captum"],
        "work": work,
        "ratio": {
            k: {m: (low if m.startswith("min") else med)["captum"] / v for m, v in w.items()}
            for k, w in work.items()
        },  # fmt: skip
        "phases": phases,
        "path": meta["path"]["method"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--models",
        default="zfnet,vgg16,resnet18",
        help="comma-separated model names (default: zfnet,vgg16,resnet18)",
    )
    ap.add_argument("--size", type=int, default=None, help="input side (default: the model's)")
    ap.add_argument("--window", type=int, default=None, help="square side (default 32 at 224)")
    ap.add_argument("--stride", type=int, default=None, help="step (default 8 at 224)")
    ap.add_argument("--repeats", type=int, default=1, help="alternating runs; best time kept")
    ap.add_argument("--ppe", type=int, default=64, help="Captum perturbations_per_eval")
    ap.add_argument("--method", default="auto", help="convlens method (auto/incremental/batched)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument(
        "--with-batched",
        action="store_true",
        help="also time convlens without incremental inference (method=batched)",
    )
    ap.add_argument(
        "--cli",
        default=None,
        metavar="MODEL",
        help="instead: the CLI comparison (convlens probe occlusion as a subprocess, start-up "
        "subtracted, vs Captum) on MODEL, at --stride (default 16) and --target (default 7)",
    )
    ap.add_argument("--target", type=int, default=None, help="class (--cli: default 7)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (model and image)")
    ap.add_argument(
        "--with-approx", action="store_true", help="also time --approx and its SSIM vs exact"
    )
    ap.add_argument(
        "--approx-precision",
        default="auto",
        choices=("auto", "fp32", "bf16"),
        help="--with-approx: number format of the approximate positions (default auto)",
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cli:
        r = cli_bench(args.cli, args.window or 32, args.stride or 16,
                      7 if args.target is None else args.target, args.ppe, args.repeats)  # fmt: skip
        print(
            f"CLI {r['model']} window {r['window']} stride {r['stride']} ({r['positions']} "
            f"positions), {r['path']}, {r['repeats']} repeats; start-up (imports, host, model) "
            f"median {r['startup_s']:.2f} s; Captum (perturbations_per_eval={args.ppe}) median "
            f"{r['captum_s']:.2f} s"
        )
        for kind, label in (("first", "first run (rule measured)"),
                            ("later", "later runs (rule read back)")):  # fmt: skip
            w, q = r["work"][kind], r["ratio"][kind]
            print(
                f"{label}: CLI - its own start-up median {w['median']:.2f} s = "
                f"{q['median']:.2f}x Captum; best {w['min']:.2f} s = {q['min']:.2f}x (best vs "
                f"best); CLI - separate start-up median {w['median_separate']:.2f} s = "
                f"{q['median_separate']:.2f}x"
            )
        for kind, ph in r["phases"].items():
            print(f"phases of the best {kind} run (s): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in ph.items()))  # fmt: skip
        print("all times (s): " + "; ".join(
            f"{k} " + " ".join(f"{v:.2f}" for v in vs) for k, vs in r["times"].items()
        ))  # fmt: skip
        print("CLI minus its own start-up (s): " + "; ".join(
            f"{k} " + " ".join(f"{v:.2f}" for v in vs) for k, vs in r["work_own"].items()
        ))  # fmt: skip
        print("Captum / CLI work, repeat by repeat: " + "; ".join(
            f"{k} " + " ".join(f"{v:.2f}x" for v in vs) + f" (median {np.median(vs):.2f}x)"
            for k, vs in r["paired"].items()
        ))  # fmt: skip
        return 0
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"Captum Occlusion perturbations_per_eval={args.ppe}",
        flush=True,
    )
    header = (
        f"{'model':<20}{'input':>6}{'win/str':>9}{'pos':>6}{'convlens s':>12}"
        f"{'captum s':>10}{'ratio':>8}{'max attr':>10}{'err/attr':>10}{'err/p0':>10}  path"
    )
    print(header)
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        r = bench(
            name,
            args.size,
            args.window,
            args.stride,
            args.repeats,
            args.ppe,
            args.method,
            args.with_batched,
            args.with_approx,
            args.device,
            args.approx_precision,
        )
        rows.append(r)
        print(
            f"{r['model']:<20}{r['input']:>6}{r['window']:>5}/{r['stride']:<3}{r['positions']:>6}"
            f"{r['convlens_s']:>12.2f}{r['captum_s']:>10.2f}{r['ratio']:>7.2f}x"
            f"{r['max_attr']:>10.1e}{r['map_err']:>10.1e}{r['map_err_p']:>10.1e}"
            f"  {r['path']} ({len(r['patch_layers'])} patch layers)",
            flush=True,
        )
        f = r["flops"]
        if f:
            print(
                f"{'':<20}MACs on patches {100 * f['patch_share']:.1f}%; bound (exact changed "
                f"units) {f['bound']:.2f}x, Krypton's equation {f['bound_krypton']:.2f}x, "
                f"executor's plan {f['planned']:.2f}x",
                flush=True,
            )
        if r["batched_s"] is not None and f:
            speedup = r["batched_s"] / r["convlens_s"]
            print(
                f"{'':<20}incremental over batched {speedup:.2f}x = "
                f"{100 * speedup / f['bound']:.0f}% of the bound "
                f"({100 * speedup / f['bound_krypton']:.0f}% of Krypton's equation)",
                flush=True,
            )
        if r["approx_s"] is not None:
            a = r["approx_record"]
            blocks = ", ".join(
                "n/a" if v is None else f"{v:.3f}" for v in a["check"]["ssim_blocks"]
            )
            print(
                f"{'':<20}approximate (--approx: coarse {a['coarse']}, drill {a['drill']}, "
                f"truncate {a['truncate']:g}, {a['precision']['format']}): {r['approx_s']:.2f} s, "
                f"Captum/approx "
                f"{r['captum_s'] / r['approx_s']:.2f}x, exact/approx "
                f"{r['convlens_s'] / r['approx_s']:.2f}x (sweeps: approx {a['sweep_s']:.2f} s, "
                f"exact {a['exact_sweep_s']:.2f} s); {a['computed_positions']['total']} of "
                f"{a['positions']} positions computed ({a['exact_positions']} exactly); SSIM of "
                f"the whole map vs exact {r['approx_ssim']:.3f} (check blocks: {blocks}; "
                f"{'meets' if a['meets_target'] else 'MISSES'} {a['target_ssim']}); stages (s): "
                + ", ".join(f"{k} {v:.2f}" for k, v in a["seconds"].items()),
                flush=True,
            )
        if r["batched_s"] is not None:
            print(
                f"{'':<20}convlens batched (no incremental): {r['batched_s']:.2f} s, "
                f"Captum/batched {r['captum_s'] / r['batched_s']:.2f}x, "
                f"batched/incremental {r['batched_s'] / r['convlens_s']:.2f}x",
                flush=True,
            )
    # Same map: within 1e-4 of the largest attribution, or within float32 rounding of the
    # probabilities themselves (1e-5 of p0) where the attribution is that small (random weights).
    bad = [r["model"] for r in rows if r["map_err"] > 1e-4 and r["map_err_p"] > 1e-5]
    if bad:
        print(f"MAPS DIFFER from Captum's for: {', '.join(bad)}")
        return 1
    print("maps agree with Captum's for every model")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
