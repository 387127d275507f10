"""Every GPU measurement of issue #16 in one go, written to ``docs/benchmarks-gpu.md``.

    make bench-gpu                                   # = python benchmarks/gpu.py (needs CUDA)
    python benchmarks/gpu.py --dry-run --out /tmp/gpu.md    # tiny sizes on the CPU: plumbing only

Runs, one after the other, each in its own process with a time limit (the whole aims at under
8 minutes on one H100/H200), and records its command, output and seconds:

1. **training throughput** of the zeiler-fergus recipe (``benchmarks/train_throughput.py``):
   zfnet and alexnet at 224, bf16 autocast + ``channels_last`` + fused SGD, against a plain fp32
   loop in the same run, img/s and achieved TFLOP/s; once without and once with
   ``torch.compile``; the input path's img/s comes with the first run;
2. **occlusion** (``benchmarks/occlusion.py --device cuda``): vgg16 and resnet50 at 224, 32 px
   square, stride 8: Captum ``Occlusion`` vs convlens batched, exact incremental and ``--approx``
   (with the SSIM of the approximate map against the exact one);
3. **deconv** projections (``benchmarks/deconv.py --part projection``; it runs on the CPU: the
   script has no device option yet, so its line is a CPU figure taken on the GPU machine).

Without CUDA (and without ``--dry-run``) it prints why and exits 0 without writing anything; the
test suite never needs a GPU. ``--dry-run`` runs the same scripts at tiny sizes on the CPU and
writes to ``--out`` (never to ``docs/`` by default): it checks the plumbing, its numbers mean
nothing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks-gpu.md"


@dataclass
class Step:
    title: str
    argv: list[str]
    timeout: int


def steps(dry_run: bool) -> list[Step]:
    py = sys.executable
    bench = str(ROOT / "benchmarks")
    if dry_run:
        return [
            Step("training throughput (recipe vs plain fp32; input path)",
                 [py, f"{bench}/train_throughput.py", "--device", "cpu", "--batch", "2",
                  "--iters", "1", "--warmup", "1", "--input-images", "4", "--workers", "1",
                  "--arch", "zfnet"], 300),
            Step("occlusion: Captum vs batched / exact / approximate",
                 [py, f"{bench}/occlusion.py", "--models", "resnet18", "--size", "64",
                  "--stride", "4", "--with-batched", "--with-approx"], 300),
        ]  # fmt: skip
    return [
        Step("training throughput, eager (recipe vs plain fp32; input path)",
             [py, f"{bench}/train_throughput.py", "--batch", "256", "--iters", "30",
              "--warmup", "5", "--input-images", "2000"], 130),
        Step("training throughput, torch.compile",
             [py, f"{bench}/train_throughput.py", "--batch", "256", "--iters", "30",
              "--warmup", "5", "--compile", "--skip-input"], 170),
        Step("occlusion: Captum vs batched / exact / approximate (224, 32 px, stride 8)",
             [py, f"{bench}/occlusion.py", "--models", "vgg16,resnet50", "--device", "cuda",
              "--with-batched", "--with-approx"], 120),
        Step("deconv projections (CPU figure, see the note)",
             [py, f"{bench}/deconv.py", "--part", "projection"], 50),
    ]  # fmt: skip


def run_step(step: Step) -> tuple[str, float, int]:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(step.argv, capture_output=True, text=True, timeout=step.timeout,
                              cwd=ROOT)  # fmt: skip
        out, rc = proc.stdout + proc.stderr[-2000:], proc.returncode
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        out += f"\n[timed out after {step.timeout} s]"
        rc = 124
    return out, time.perf_counter() - t0, rc


def render(device: str, results: list[tuple[Step, str, float, int]], dry_run: bool) -> str:
    """The markdown page: the device, then each step's command, exit status, seconds, output."""
    import torch

    lines = [
        "# GPU benchmarks (`make bench-gpu`)",
        "",
        "**DRY RUN on the CPU at tiny sizes: plumbing check, the numbers mean nothing.**"
        if dry_run
        else "Written by `benchmarks/gpu.py`; every number below comes from the output shown.",
        "",
        f"- device: **{device}**",
        f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- torch {torch.__version__}, Python {platform.python_version()}",
        f"- total: {sum(r[2] for r in results):.0f} s",
        "",
    ]
    for step, out, secs, rc in results:
        cmd = " ".join(Path(a).name if a == sys.executable else a for a in step.argv)
        cmd = cmd.replace(str(ROOT) + "/", "")
        lines += [
            f"## {step.title}",
            "",
            f"`{cmd}` — exit {rc}, {secs:.0f} s",
            "",
            "```",
            out.strip(),
            "```",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    ap.add_argument("--out", default=None, help=f"markdown file (default {DOC} on CUDA)")
    args = ap.parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("bench-gpu: no CUDA device here; nothing measured, nothing written "
              "(python benchmarks/gpu.py --dry-run --out FILE checks the plumbing on the CPU)")  # fmt: skip
        return 0
    if args.dry_run and args.out is None:
        ap.error("--dry-run needs --out (dry-run numbers never go to docs/)")
    device = (
        torch.cuda.get_device_name(0)
        if not args.dry_run
        else f"CPU ({platform.processor() or platform.machine()})"
    )
    results = []
    for step in steps(args.dry_run):
        print(f"== {step.title}", flush=True)
        out, secs, rc = run_step(step)
        print(out.strip()[-3000:], f"\n[{secs:.0f} s, exit {rc}]", flush=True)
        results.append((step, out, secs, rc))
    path = Path(args.out) if args.out else DOC
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(render(device, results, args.dry_run), encoding="utf-8")
    tmp.replace(path)
    print(f"written: {path}")
    return 0 if all(r[3] == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
