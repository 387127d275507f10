"""Sanity checks: convlens vs Quantus on the same model, images and maps, side by side.

Quantus is not a dependency of convlens; install it beside convlens for this script only, e.g. in a
throw-away venv that sees convlens's packages:

    python3 -m venv /tmp/qvenv
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/qvenv/lib/python3.11/site-packages/cl.pth
    /tmp/qvenv/bin/pip install quantus
    PYTHONPATH=.:plugins /tmp/qvenv/bin/python benchmarks/sanity.py

**Deletion.** Quantus's ``PixelFlipping`` is the deletion curve: features in the attribution's
order replaced by a baseline, ``features_in_step`` at a time, the class probability after each
step. Its features are channel values (the one-channel map is broadcast to the three channels) and
it requires ``features_in_step`` to divide ``H·W``; with ``features_in_step = H·W / N`` it takes
``3N`` steps, and after step ``3k`` exactly the top ``k·H·W/N`` pixels are replaced in all three
channels — convlens's point ``k`` (the other ``2N`` points, pixels replaced in one or two
channels, are Quantus's extra cost of this definition). ``perturb_baseline = 0.0`` (convlens's default fill, the
dataset mean pixel, is 0 in model input space), ``normalise=False, abs=False`` and ``softmax=True``,
these points are convlens's deletion curve after steps 1 … N. Definitions differ in two places, both
documented and removed before comparing: Quantus has no point for the unperturbed image (convlens
has ``k = 0``), and its AUC is ``np.trapz`` with ``dx = 1`` over the N points (convlens: the
trapezoid over ``x = k / N`` from 0 to 1, N + 1 points). The script prints the largest difference of
the curves' points and both AUCs. Maps: the gradient map and a random map (float32, no ties: ties
are ordered by index in convlens and by NumPy's unstable sort in Quantus).

**Randomisation.** Quantus's ``MPRT`` (cascading, ``layer_order="top_down"``) re-initialises every
module with ``reset_parameters`` one at a time (attribute order, reversed; one seed for all) and
re-explains after each; convlens re-initialises blocks (forward order, a seed per step). Granularity
and seeds differ, so the similarity along the way cannot agree exactly; what can be compared is the
Spearman correlation once *every* layer is random (``return_last_correlation=True``), and the time
per re-initialised model (on ``--mprt-images`` images). Both explain with convlens's gradient map,
so per re-initialised model the two cost about the same (explaining dominates; convlens also
computes SSIM); the difference is in how many models a cascade needs: Quantus one per layer with
parameters (99 on efficientnet_lite0), convlens one per step (3 by default, at most one per block).

Times are wall-clock seconds in one process on the same inputs, the best of ``--repeats``
alternating runs of each for the deletion (the machine may be shared).
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--images", type=int, default=6, help="bundled photos to use (max 6)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs; best time kept")
    ap.add_argument("--mprt-images", type=int, default=2, help="images of the MPRT comparison")
    ap.add_argument("--no-mprt", action="store_true", help="skip the randomisation comparison")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    try:
        import quantus
    except ImportError:
        raise SystemExit(
            "this benchmark needs Quantus: pip install quantus (see the docstring)"
        ) from None
    from convlens_sanity import (
        MapSettings,
        cascade_plan,
        compute_maps,
        curves,
        model_blocks,
        randomised,
        similarity,
    )

    from convlens.data import Preprocess, default_images, load_batch
    from convlens.models import create_model

    torch.manual_seed(0)
    model = create_model(args.model).eval()
    x, paths = load_batch(default_images()[: args.images], Preprocess.for_model(model))
    n, c, h, w = x.shape
    with torch.inference_mode():
        targets = model(x).argmax(1).tolist()
    settings = MapSettings(window=32, stride=16, fill=(0.0, 0.0, 0.0), gradcam_layer="")
    print(f"model {args.model}, {n} images {h}x{w}, targets {targets}, "
          f"threads {torch.get_num_threads()}, quantus {quantus.__version__}")  # fmt: skip

    def gradient_map(m, xs, ts):
        return compute_maps(m, torch.as_tensor(xs), list(ts), ["gradient"], settings)["gradient"]

    grad = gradient_map(model, x, targets).astype(np.float32)
    rng = np.random.default_rng(0)
    maps = {"gradient": grad + rng.random(grad.shape).astype(np.float32) * 1e-4,  # no ties
            "random": rng.random((n, h, w)).astype(np.float32)}  # fmt: skip
    assert h * w % args.steps == 0, "steps must divide H*W for an exact comparison"
    print(f"\n# deletion, {args.steps} steps")
    print(
        "map        convlens s  quantus s   ratio   max |Δp|   AUC convlens  AUC (Quantus's "
        "trapz, its points)  (same, convlens's points)"
    )
    total = {"convlens": 0.0, "quantus": 0.0}
    for name, m in maps.items():
        metric = quantus.PixelFlipping(
            features_in_step=h * w // args.steps, perturb_baseline=0.0, normalise=False,
            abs=False, disable_warnings=True, display_progressbar=False,
        )  # fmt: skip
        t_ours = t_q = float("inf")
        for _ in range(args.repeats):  # alternating, best of each: the machine may be shared
            t0 = time.perf_counter()
            ours = curves(model, x, m, targets, (0.0,) * 3, args.steps, kinds=("deletion",))
            t_ours = min(t_ours, time.perf_counter() - t0)
            t0 = time.perf_counter()
            theirs = metric(model=model, x_batch=x.numpy(), y_batch=np.asarray(targets),
                            a_batch=m[:, None], device="cpu", softmax=True, channel_first=True,
                            batch_size=64)  # fmt: skip
            t_q = min(t_q, time.perf_counter() - t0)
        # Quantus's features are channel values: the map broadcast to three channels, a step of
        # H·W/N values, 3N steps; after step 3k the top k·H·W/N pixels are fully perturbed
        theirs = np.asarray(theirs, dtype=np.float64)[:, c - 1 :: c]
        ours_d = ours["deletion"].astype(np.float64)
        diff = float(np.abs(ours_d[:, 1:] - theirs).max())
        auc_ours = float(((ours_d[:, 1:] + ours_d[:, :-1]).sum(1) / (2 * args.steps)).mean())
        auc_q = float(np.mean([np.trapezoid(t, dx=1) for t in theirs]))
        auc_q_from_ours = float(np.mean([np.trapezoid(t, dx=1) for t in ours_d[:, 1:]]))
        total["convlens"] += t_ours
        total["quantus"] += t_q
        print(f"{name:10s} {t_ours:9.2f} {t_q:10.2f} {t_q / t_ours:7.1f}x {diff:10.2e} "
              f"{auc_ours:12.4f} {auc_q:12.4f} {auc_q_from_ours:22.4f}")  # fmt: skip
    print(f"{'all':10s} {total['convlens']:9.2f} {total['quantus']:10.2f} "
          f"{total['quantus'] / total['convlens']:7.1f}x")  # fmt: skip
    if args.no_mprt:
        return

    print("\n# cascading randomisation (gradient map), every layer random at the end")
    metric = quantus.MPRT(layer_order="top_down", return_last_correlation=True, abs=True,
                          normalise=True, disable_warnings=True, display_progressbar=False)  # fmt: skip

    def explain(model, inputs, targets, **kwargs):
        return gradient_map(model, inputs, targets)[:, None].astype(np.float32)

    k = min(args.mprt_images, n)
    xk, tk, gk = x[:k], targets[:k], grad[:k]
    t0 = time.perf_counter()
    q_last = metric(model=model, x_batch=xk.numpy(), y_batch=np.asarray(tk), a_batch=None,
                    explain_func=explain, device="cpu", channel_first=True, batch_size=64)  # fmt: skip
    t_q = time.perf_counter() - t0
    n_layers = sum(1 for _, mod in model.named_modules() if hasattr(mod, "reset_parameters"))
    blocks = model_blocks(model, x)
    plan = cascade_plan(blocks, len(blocks))
    t0 = time.perf_counter()
    last = None
    for s, step in enumerate(plan):
        twin = randomised(model, step, seed=s + 1)
        got = gradient_map(twin, xk, tk)
        last = [similarity(gk[i], got[i])[0] for i in range(k)]  # Spearman and SSIM
    t_ours = time.perf_counter() - t0
    print(f"{k} images")
    print(
        f"quantus MPRT : {n_layers} re-initialised models in {t_q:.1f} s "
        f"({t_q / n_layers:.3f} s each); last Spearman {np.mean(q_last):.3f}"
    )
    print(
        f"convlens     : {len(plan)} re-initialised models in {t_ours:.1f} s "
        f"({t_ours / len(plan):.3f} s each); last Spearman {np.mean(last):.3f}"
    )
    print(
        f"time per re-initialised model, quantus / convlens: "
        f"{(t_q / n_layers) / (t_ours / len(plan)):.1f}x"
    )


if __name__ == "__main__":
    main()
