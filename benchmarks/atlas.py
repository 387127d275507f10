"""``convlens atlas`` benchmark (issue #13): pass 1 against a plain forward, pass 2's projections
per second, the site's size per unit, peak memory for 500 vs 5,000 images, and (with a GPU)
pass 1 of resnet50 at batch 256.

    .venv/bin/python benchmarks/atlas.py                    # every CPU part
    .venv/bin/python benchmarks/atlas.py --part pass1 --n 2000
    .venv/bin/python benchmarks/atlas.py --part pass2
    .venv/bin/python benchmarks/atlas.py --part rss
    .venv/bin/python benchmarks/atlas.py --part gpu         # needs CUDA

1. **pass1** — ``N`` (2,000) generated 256x256 images, preprocessed once into memory (so that
   decoding, which both sides would pay alike, does not dilute the difference), through
   efficientnet_lite0 (ImageNet weights): a plain ``torch.inference_mode`` forward of the whole
   model against the atlas's pass 1 (``mine_topk_layers`` with ``summaries=True`` at the five
   default layers, all units, top-9, stopped after the deepest of them), batch 32, alternated
   ``--repeat`` times (best of each side). The issue's target: overhead <= 25 %. Then pass 1
   once more from the JPEG files (decoding included), for the images/s a user sees.
2. **pass2** — ``build_atlas`` on 200 of those images, units 0-7 of the five default layers:
   projections per second of pass 2 (rule choice excluded; Fig. 2 drawing included and also
   reported on its own), and the site's size on disk per unit.
3. **rss** — peak resident memory (``ru_maxrss``) of a fresh process running pass 1 over 500 and
   over 5,000 generated 64x64 JPEG files (efficientnet_lite0 at a 64-pixel input, five default
   layers, all units): memory bounded by units x k, not by the number of images.
4. **gpu** — resnet50 (random weights), batch 256, 224x224 random inputs on the GPU: images/s of
   pass 1 (five default layers, all units, summaries) against a plain forward.

The machine may be shared: times are noisy; the ratios come from one process, side by side.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def make_images(folder: Path, n: int, size: int, seed: int = 0) -> list[Path]:
    """Seeded photo-like JPEGs: smooth colour fields, stripes at random angles, noise."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    files = []
    for i in range(n):
        f = folder / f"img{i:05d}.jpg"
        files.append(f)
        if f.exists():
            continue
        a = rng.uniform(0, np.pi)
        freq = rng.uniform(2, 30)
        stripes = np.sin((np.cos(a) * xx + np.sin(a) * yy) * freq * np.pi)
        base = rng.uniform(0, 1, 3)[None, None, :] * 0.6 + 0.2
        field = xx[..., None] * rng.uniform(-0.3, 0.3, 3) + yy[..., None] * rng.uniform(
            -0.3, 0.3, 3
        )
        img = base + field + 0.25 * stripes[..., None] * rng.uniform(-1, 1, 3) + rng.normal(
            0, 0.05, (size, size, 3))  # fmt: skip
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(f, quality=90)
    return files


def _lite0():
    from convlens.models import create_model

    return create_model("efficientnet_lite0").eval()


def _timed(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def part_pass1(n: int, repeat: int, tmp: Path) -> None:
    from convlens_deconv import mine_topk_layers

    from convlens.data import Preprocess, load_image, open_dataset
    from convlens.engine import depth_layers

    model = _lite0()
    pre = Preprocess.for_model(model)
    files = make_images(tmp / "img256", n, 256)
    x = torch.stack([pre(load_image(f)) for f in files])
    layers = [lay for lay, _ in depth_layers(model)]
    bs = 32

    def plain() -> None:
        with torch.inference_mode():
            for i in range(0, n, bs):
                model(x[i : i + bs])

    def atlas_pass1() -> None:
        mine_topk_layers(model, layers, x, k=9, batch_size=bs, summaries=True,
                         stop_at=layers[-1])  # fmt: skip

    plain()  # warm-up
    res: dict[str, list[tuple[float, float]]] = {"plain": [], "pass1": []}
    for _ in range(repeat):
        res["plain"].append(_timed(plain))
        res["pass1"].append(_timed(atlas_pass1))
    bp = min(res["plain"])
    b1 = min(res["pass1"])
    units = sum(int(c) for c in _channels(model, layers))
    print(f"[pass1] efficientnet_lite0, {n} images 256x256 -> 224x224, batch {bs}, layers "
          f"{', '.join(layers)} ({units} units), best of {repeat}")  # fmt: skip
    print(f"  plain inference_mode forward  {bp[0]:7.2f} s wall  {bp[1]:7.2f} s CPU  "
          f"{n / bp[0]:6.1f} img/s")  # fmt: skip
    print(f"  atlas pass 1 (top-9+summary)  {b1[0]:7.2f} s wall  {b1[1]:7.2f} s CPU  "
          f"{n / b1[0]:6.1f} img/s")  # fmt: skip
    print(f"  overhead                      {100 * (b1[0] / bp[0] - 1):+6.1f} % wall  "
          f"{100 * (b1[1] / bp[1] - 1):+6.1f} % CPU   (target <= +25 %)")  # fmt: skip
    print(f"  all runs (wall s): plain {[round(r[0], 2) for r in res['plain']]}, "
          f"pass 1 {[round(r[0], 2) for r in res['pass1']]}")  # fmt: skip
    ds = open_dataset(tmp / "img256")
    w, _ = _timed(lambda: mine_topk_layers(model, layers, ds, k=9, batch_size=bs, summaries=True,
                                           preprocess=pre, stop_at=layers[-1]))  # fmt: skip
    print(
        f"  pass 1 from the JPEG files (decode + preprocess included): {w:.2f} s, {n / w:.1f} img/s"
    )


def _channels(model, layers):
    from convlens.engine import trace_model

    rec = trace_model(model)
    return [rec.layer(lay).output_shape[1] for lay in layers]


def part_pass2(tmp: Path) -> None:
    from convlens_atlas import build_atlas

    model = _lite0()
    files = make_images(tmp / "img256", 200, 256)
    out = tmp / "site"
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = build_atlas(model, out, model_name="efficientnet_lite0", images=[str(f) for f in files],
                        units="0-7", k=9, batch_size=32)  # fmt: skip
    t = r.timings
    n_units = sum(ld["units"] for ld in r.doc["layers"])
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"[pass2] efficientnet_lite0, 200 images, units 0-7 of {len(r.doc['layers'])} layers "
          f"({n_units} units), top-9")  # fmt: skip
    print(
        f"  pass 2: {t['pass2_projections']} projections (+ the effective-field pre-pass) in "
        f"{t['pass2_s']:.2f} s = {t['pass2_projections'] / t['pass2_s']:.1f} projections/s "
        "(Fig. 2 drawing included)"
    )
    print(f"  rules (image_specificity per layer) {t['rules_s']:.2f} s, pages {t['site_s']:.2f} s")
    print(
        f"  site: {size / 1e6:.2f} MB for {n_units} units = {size / n_units / 1e3:.0f} kB per unit"
    )
    for ld in r.doc["layers"]:
        print(f"    {ld['layer']}: rule {ld['rule']}, crop {ld['crop_size']}")


_RSS_CHILD = """
import json, resource, sys, warnings
sys.path[:0] = [{root!r}, {root!r} + "/plugins", {root!r} + "/recipes"]
warnings.simplefilter("ignore")
import torch
from convlens.runner import load_model
from convlens.data import open_dataset
from convlens.engine import depth_layers
from convlens_deconv import mine_topk_layers
model, _ = load_model("efficientnet_lite0", input_size=64)
files = sorted(__import__("pathlib").Path({folder!r}).glob("*.jpg"))[:{n}]
layers = [lay for lay, _ in depth_layers(model)]
tops = mine_topk_layers(model, layers, open_dataset(files), k=9, batch_size=32, summaries=True,
                        stop_at=layers[-1])
print(json.dumps({{"n": tops[layers[-1]].n_images, "units": sum(len(t.channels) for t in
      tops.values()), "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}}))
"""


def part_rss(tmp: Path) -> None:
    folder = tmp / "img64"
    make_images(folder, 5000, 64, seed=1)
    rows = []
    for n in (500, 5000):
        code = _RSS_CHILD.format(root=str(ROOT), folder=str(folder), n=n)
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True)  # fmt: skip
        r = json.loads(p.stdout.strip().splitlines()[-1])
        rows.append((n, r["maxrss_kb"] / 1024, time.perf_counter() - t, r["units"]))
    print(
        "[rss] pass 1, efficientnet_lite0 at 64x64, five default layers, all units, top-9 + "
        "summaries, batch 32, in a fresh process each"
    )
    for n, mb, s, units in rows:
        print(f"  {n:5d} images: peak RSS {mb:7.1f} MB ({units} units, {s:.1f} s)")
    print(f"  5,000 vs 500: {100 * (rows[1][1] / rows[0][1] - 1):+.1f} % (target: within 10 %)")


def part_gpu(n_batches: int = 10) -> None:
    if not torch.cuda.is_available():
        print("[gpu] no CUDA device: skipped")
        return
    from convlens_deconv import mine_topk_layers

    from convlens.engine import depth_layers
    from convlens.models import create_model

    dev = torch.device("cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = create_model("resnet50").eval().to(dev)
    layers = [lay for lay, _ in depth_layers(model)]
    bs = 256
    x = torch.randn(bs * n_batches, 3, 224, 224, device=dev)

    def plain() -> None:
        with torch.inference_mode():
            for i in range(0, len(x), bs):
                model(x[i : i + bs])
        torch.cuda.synchronize()

    def pass1() -> None:
        mine_topk_layers(model, layers, x, k=9, batch_size=bs, summaries=True, device=dev,
                         stop_at=layers[-1])  # fmt: skip
        torch.cuda.synchronize()

    plain()
    tp = min(_timed(plain)[0] for _ in range(3))
    t1 = min(_timed(pass1)[0] for _ in range(3))
    print(f"[gpu] resnet50, batch {bs}, {len(x)} images, layers {', '.join(layers)} "
          f"({torch.cuda.get_device_name()})")  # fmt: skip
    print(
        f"  plain forward {len(x) / tp:8.1f} img/s; atlas pass 1 {len(x) / t1:8.1f} img/s; "
        f"overhead {100 * (t1 / tp - 1):+.1f} %"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("all", "pass1", "pass2", "rss", "gpu"), default="all")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--tmp", type=Path, default=None, help="Keep the generated images here.")
    a = ap.parse_args()
    tmp = a.tmp or Path(tempfile.mkdtemp(prefix="convlens-atlas-bench-"))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"max RSS so far {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"
    )
    if a.part in ("all", "pass1"):
        part_pass1(a.n, a.repeat, tmp)
    if a.part in ("all", "pass2"):
        part_pass2(tmp)
    if a.part in ("all", "rss"):
        part_rss(tmp)
    if a.part in ("all", "gpu"):
        part_gpu()


if __name__ == "__main__":
    main()
