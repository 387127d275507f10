"""``--approx`` settings side by side on one model: time and whole-map SSIM against exact.

One process, one model (seeded weights; ``torch.manual_seed(0)``), the bundled coffee photo at
the model's input size, 32 px square, stride 8 (625 positions), the unoccluded top-1 class, fill
0. The exact map is computed first (its fixed costs are then cached for every approximate run
after it, as in any run on many images); each setting is given as Python keyword arguments of
``occlusion_maps``::

    PYTHONPATH=.:plugins python benchmarks/occlusion_approx_settings.py vgg16 \\
        "approx_drill=0.3" "approx_drill=0.6" "approx_drill=1.0" "approx_precision='fp32'"

prints, per setting: seconds, the whole map's SSIM against exact (scikit-image, 7 x 7 window,
data range of the exact map), the check blocks' SSIM, the seconds of each stage and the positions
computed.
"""

from __future__ import annotations

import ast
import sys
import time
import warnings

import numpy as np
import torch
from convlens_occlusion import occlusion_maps
from convlens_occlusion._approx import ssim

from convlens.data import Preprocess, load_batch, sample
from convlens.models import create_model


def _kwargs(text: str) -> dict:
    call = ast.parse(f"f({text})", mode="eval").body
    return {k.arg: ast.literal_eval(k.value) for k in call.keywords}


def main(argv: list[str]) -> int:
    warnings.simplefilter("ignore")
    name, settings = argv[0], argv[1:] or [""]
    torch.manual_seed(0)
    model = create_model(name).eval()
    x, _ = load_batch([sample("coffee").path], Preprocess.for_model(model))
    with torch.inference_mode():
        target = int(model(x).argmax())
    common = dict(window=32, stride=8, target=target, fill=0.0)
    t = time.perf_counter()
    exact = occlusion_maps(model, x, **common)
    print(f"{name}: exact {time.perf_counter() - t:.2f} s", flush=True)
    ref = exact.prob_target[0]
    for text in settings:
        kw = _kwargs(text)
        t = time.perf_counter()
        res = occlusion_maps(model, x, approx=True, **common, **kw)
        took = time.perf_counter() - t
        rec = res.path["approx"]["per_image"][0]
        whole = ssim(res.prob_target[0], ref, float(np.ptp(ref)))
        blocks = [round(v, 3) for v in rec["check"]["ssim_blocks"]]
        print(
            f"{text or '(defaults)'}: {took:.2f} s, whole-map SSIM {whole:.3f}, check {blocks}, "
            f"{rec['precision']['format']}, drill {rec['drill']}, stages {rec['seconds']}, "
            f"positions {rec['computed_positions']}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
