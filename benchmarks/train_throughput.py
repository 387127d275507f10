"""Training throughput of the zeiler-fergus recipe: its step against a plain fp32 PyTorch loop of
the same model in the same process, and the input path's img/s on a folder of JPEGs.

    python benchmarks/train_throughput.py                                   # CUDA: 224, batch 128
    python benchmarks/train_throughput.py --compile                         # + torch.compile
    python benchmarks/train_throughput.py --device cpu --batch 16 --iters 3 --warmup 1 \\
        --input-images 64 --workers 1                                       # what fits on a CPU
    python benchmarks/train_throughput.py --jpeg-dir /data/imagenet/train --input-images 5000

Training (synthetic batches, zfnet and alexnet at 224×224, 1000 classes):

* **recipe** — what ``convlens recipe zeiler-fergus`` runs per step (``train.TrainStep`` after
  ``data.BatchPrep``): uint8 256×256 crops on the device → minus the mean image → random 224
  crops and flips gathered into ``channels_last``; forward under bf16 autocast (CUDA; ``--amp``
  forces it elsewhere), fp32 loss, backward, fused SGD (where the build has it), filter RMS
  renormalisation; ``--compile`` wraps the model in ``torch.compile``.
* **plain** — the textbook loop: fp32 NCHW input already cropped, fp32 model, ``SGD`` with
  PyTorch's default implementation, no renormalisation.

Both start from the same weights; one step on the same batch must give the same loss (within
bf16 round-off) — the script checks it before timing. Achieved TFLOP/s counts the model's
forward + backward FLOPs with ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and
matrix products; elementwise work is not counted).

Input path (images/s into uint8 256×256 centre crops; ``--jpeg-dir`` or generated 500×375
JPEGs, ImageNet's typical size): PIL decode + resize in DataLoader workers; file bytes decoded
in batches by ``torchvision.io.decode_jpeg`` on the device (nvJPEG on CUDA); and reading a pack
(sharded uint8 memmaps, written once by ``data.pack``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
for extra in (ROOT, ROOT / "recipes"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from convlens_zeiler_fergus.config import TrainConfig  # noqa: E402
from convlens_zeiler_fergus.data import (  # noqa: E402
    BatchPrep,
    EncodedDataset,
    FolderDataset,
    PackedDataset,
    Split,
    crop_params,
    decode_batch,
    pack,
)
from convlens_zeiler_fergus.experiments import build_model  # noqa: E402
from convlens_zeiler_fergus.train import (  # noqa: E402
    TrainStep,
    make_optimizer,
    resolve_speed,
)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_flops_per_image(arch: str, size: int, device: torch.device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(TrainConfig(experiment=arch, input_size=size), 1000).to(device)
    x = torch.randn(2, 3, size, size, device=device)
    y = torch.zeros(2, dtype=torch.long, device=device)
    with FlopCounterMode(display=False) as fc:
        F.cross_entropy(model(x), y).backward()
    return fc.get_total_flops() / 2


def time_loop(fn, iters: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return time.perf_counter() - t


def bench_training(arch: str, args: argparse.Namespace, device: torch.device) -> dict:
    b, size, resize = args.batch, args.size, args.resize
    cfg = TrainConfig(
        experiment=arch,
        input_size=size,
        resize=resize,
        batch_size=b,
        compile=args.compile,
        precision="bf16" if args.amp else "auto",
        channels_last="on" if args.channels_last else "auto",
    )
    speed = resolve_speed(cfg, device)
    torch.manual_seed(0)
    recipe_model = build_model(cfg, 1000).to(device)
    plain_model = build_model(cfg, 1000).to(device)
    plain_model.load_state_dict(recipe_model.state_dict())
    if speed.channels_last:
        recipe_model = recipe_model.to(memory_format=torch.channels_last)
    fwd = torch.compile(recipe_model) if speed.compile else recipe_model
    opt_r = make_optimizer(recipe_model, cfg, speed.fused)
    step = TrainStep(fwd, recipe_model, opt_r, speed.amp_dtype, cfg.filter_rms_radius)
    opt_p = torch.optim.SGD(plain_model.parameters(), lr=cfg.lr, momentum=cfg.momentum)

    g = torch.Generator().manual_seed(1)
    x8 = torch.randint(0, 256, (b, 3, resize, resize), dtype=torch.uint8, generator=g).to(device)
    mean = torch.full((3, resize, resize), 118.0)
    prep = BatchPrep(mean, size, device, speed.channels_last)
    y = torch.randint(0, 1000, (b,), generator=g).to(device)
    dy, dx, fl = crop_params(0, 0, 0, b, resize, size)
    x_plain = prep.crops(x8, dy, dx, fl).contiguous()  # plain: an fp32 NCHW batch, ready

    def plain_step() -> torch.Tensor:
        opt_p.zero_grad()
        loss = F.cross_entropy(plain_model(x_plain), y)
        loss.backward()
        opt_p.step()
        return loss

    counter = [0]

    def recipe_step() -> torch.Tensor:
        counter[0] += 1
        d = crop_params(0, 0, counter[0], b, resize, size)
        return step(prep.crops(x8, *d), y)[0]

    # agreement: one step each from the same weights on the same batch (dropout off for it)
    recipe_model.eval()
    plain_model.eval()  # eval() only disables dropout; the steps still train
    lr_ = step(prep.crops(x8, dy, dx, fl), y)[0].item()
    lp_ = plain_step().item()
    recipe_model.train()
    plain_model.train()
    agree = abs(lr_ - lp_) <= 0.02 * abs(lp_) + 1e-3
    t_plain = time_loop(plain_step, args.iters, args.warmup, device)
    t_recipe = time_loop(recipe_step, args.iters, args.warmup + (2 if speed.compile else 0), device)
    ips_p, ips_r = args.iters * b / t_plain, args.iters * b / t_recipe
    flops = train_flops_per_image(arch, size, device)
    return {
        "arch": arch,
        "plain_ips": ips_p,
        "recipe_ips": ips_r,
        "ratio": ips_r / ips_p,
        "flops_per_image": flops,
        "plain_tflops": flops * ips_p / 1e12,
        "recipe_tflops": flops * ips_r / 1e12,
        "loss_plain": lp_,
        "loss_recipe": lr_,
        "agree": agree,
        "speed": speed.to_dict(),
    }


def make_jpegs(folder: Path, n: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    d = folder / "c"
    d.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:375, 0:500]
    for i in range(n):
        base = (
            np.stack(
                [np.sin(xx / (7 + i % 5)), np.cos(yy / (9 + i % 3)), np.sin((xx + yy) / 11)], -1
            )
            * 90
            + 128
        )
        arr = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(d / f"{i:05d}.JPEG", quality=90)
    return folder


def bench_input(args: argparse.Namespace, device: torch.device) -> list[tuple[str, float]]:
    from torch.utils.data import BatchSampler, DataLoader

    with tempfile.TemporaryDirectory() as tmp:
        root = (
            Path(args.jpeg_dir)
            if args.jpeg_dir
            else make_jpegs(Path(tmp) / "jpegs", args.input_images)
        )
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
        files = files[: args.input_images]
        split = Split(root, ["c"], [(str(p), 0) for p in files])
        n, b, out = len(split), min(64, len(split)), []

        def run(dataset, encoded: bool, workers: int) -> float:
            from convlens_zeiler_fergus.data import collate_encoded

            loader = DataLoader(
                dataset,
                batch_sampler=BatchSampler(range(n), b, False),
                num_workers=workers,
                collate_fn=collate_encoded if encoded else None,
                pin_memory=device.type == "cuda",
            )
            t = time.perf_counter()
            for xb, _ in loader:
                x = decode_batch(xb, args.resize, device) if encoded else xb.to(device)
            sync(device)
            assert x.shape[1:] == (3, args.resize, args.resize)
            return n / (time.perf_counter() - t)

        out.append(
            (
                f"PIL decode+resize in {args.workers} worker(s)",
                run(FolderDataset(split, args.resize), False, args.workers),
            )
        )
        out.append(
            (
                f"decode_jpeg on {device.type} (bytes from {args.workers} worker(s))",
                run(EncodedDataset(split), True, args.workers),
            )
        )
        pack(split, Path(tmp) / "pack", args.resize, args.workers, with_mean=False)
        out.append(
            (
                f"pack (uint8 memmap) in {args.workers} worker(s)",
                run(PackedDataset(Path(tmp) / "pack"), False, args.workers),
            )
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arch", action="append", choices=("zfnet", "alexnet"))
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--resize", type=int, default=256)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--amp", action="store_true", help="bf16 autocast also off CUDA")
    p.add_argument("--channels-last", action="store_true", help="also off CUDA")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--jpeg-dir", default=None)
    p.add_argument("--input-images", type=int, default=512)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--skip-input", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else (f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)")
    )
    print(
        f"device: {name}; torch {torch.__version__}; batch {args.batch}, {args.size}x"
        f"{args.size} crops of {args.resize}; {args.iters} timed steps after {args.warmup}"
    )
    ok = True
    for arch in args.arch or ["zfnet", "alexnet"]:
        r = bench_training(arch, args, device)
        s = r["speed"]
        print(
            f"\n{arch}: {r['flops_per_image'] / 1e9:.2f} GFLOP per training image "
            f"(forward + backward)"
        )
        print(
            f"  plain fp32 loop     {r['plain_ips']:10.1f} img/s  {r['plain_tflops']:7.3f} TFLOP/s"
        )
        print(
            f"  recipe step         {r['recipe_ips']:10.1f} img/s  {r['recipe_tflops']:7.3f} "
            f"TFLOP/s  ({s['precision']}, channels_last={s['channels_last']}, "
            f"{s['optimizer']} SGD, compile={s['compile']})"
        )
        print(f"  ratio recipe/plain  {r['ratio']:10.2f}x")
        print(
            f"  agreement: first-step loss {r['loss_recipe']:.4f} (recipe) vs "
            f"{r['loss_plain']:.4f} (plain): {'ok' if r['agree'] else 'MISMATCH'}"
        )
        ok &= r["agree"]
        if device.type == "cuda":
            epoch = 1_281_167 / r["recipe_ips"]
            print(
                f"  one ImageNet epoch {epoch / 60:.1f} min; 70 epochs "
                f"{70 * epoch / 3600:.2f} h (compute only)"
            )
    if not args.skip_input:
        print(
            f"\ninput path ({args.input_images} JPEGs → uint8 {args.resize}x{args.resize} "
            f"centre crops on {device.type}):"
        )
        for label, ips in bench_input(args, device):
            print(f"  {label:48s} {ips:9.1f} img/s")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
