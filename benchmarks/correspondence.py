"""Correspondence probe (Section 4.3): its two inner costs, side by side with plain PyTorch.

    .venv/bin/python benchmarks/correspondence.py            # CPU, efficientnet_lite0
    .venv/bin/python benchmarks/correspondence.py --repeat 5

1. The Delta kernel: ``sign_hamming`` (three indicator matrix products) against the direct
   ``(s[:, None] != s[None]).sum(-1)`` comparison, on sign vectors the size of the default
   layers, N = 5 (Table 1) and N = 20 — checked equal.
2. Feature extraction: ``convlens_correspondence.extract`` (the engine's ``record``) against
   plain ``register_forward_hook``s, on the five embedded faces — checked bit-identical.

Prints the median time of each side and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from convlens_correspondence import embedded_faces, extract, sign_hamming

from convlens.data import Preprocess
from convlens.models import create_model


def _time(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _direct(eps: torch.Tensor) -> torch.Tensor:
    s = torch.sign(eps)
    return (s[:, None, :] != s[None, :, :]).sum(-1)


def _plain(model, x, names):
    modules = dict(model.named_modules())
    got, handles = {}, []
    for name in names:

        def hook(_m, _i, out, name=name):
            got[name] = out.detach().clone().reshape(out.shape[0], -1)

        handles.append(modules[name].register_forward_hook(hook))
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")

    print("\n1. Delta kernel: sign_hamming vs direct comparison")
    g = torch.Generator().manual_seed(0)
    for n, d, what in ((5, 62_720, "bn2.act"), (5, 401_408, "bn1.act"), (20, 62_720, "bn2.act")):
        eps = torch.randint(-1, 2, (n, d), generator=g).float()
        ours, ref = sign_hamming(eps), _direct(eps)
        assert torch.equal(ours, ref.to(ours.dtype)), "kernels disagree"
        a = _time(lambda eps=eps: sign_hamming(eps), args.repeat)
        b = _time(lambda eps=eps: _direct(eps), args.repeat)
        print(
            f"  N={n:2d} D={d:7d} ({what}): sign_hamming {a * 1e3:7.1f} ms, "
            f"direct {b * 1e3:7.1f} ms, ratio {b / a:5.2f}x  (equal: yes)"
        )

    print("\n2. Feature extraction: convlens extract (record) vs plain forward hooks")
    model = create_model("efficientnet_lite0")
    pre = Preprocess.for_model(model)
    x = torch.stack([pre(it.image) for it in embedded_faces()])
    layers = ["bn2.act", "global_pool.pool"]
    ours, _ = extract(model, x, layers)
    ref = _plain(model, x, layers)
    for layer in layers:
        assert torch.equal(ours[layer], ref[layer]), f"{layer}: features differ"
    a = _time(lambda: extract(model, x, layers), args.repeat)
    b = _time(lambda: _plain(model, x, layers), args.repeat)
    print(
        f"  5 faces, {', '.join(layers)}: extract {a * 1e3:7.1f} ms, plain hooks "
        f"{b * 1e3:7.1f} ms, ratio {a / b:5.2f}x  (bit-identical: yes)"
    )


if __name__ == "__main__":
    main()
