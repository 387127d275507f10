"""``convlens probe linear``: how discriminative each layer's features are, by linear classifiers
trained on frozen features (Zeiler & Fergus 2014, Sec. 5.2 "Feature Generalization", Tables 4, 5;
Sec. 5.3 "Feature Analysis", Table 7; Fig. 9: accuracy against training images per class)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from convlens.data import Preprocess
from convlens.errors import ConvlensError
from convlens.io import atomic_path, write_json
from convlens.options import Option, parse_int_list, parse_str_list
from convlens.probe import Probe, ProbeContext, ProbeResult, ReportSection
from convlens.render.report import esc
from convlens_linear._classifiers import CLASSIFIERS, DEFAULT_C_GRID
from convlens_linear._dataset import EMBEDDED, embedded_dataset, scan_image_folder
from convlens_linear._features import (
    DEFAULT_MAX_DIM,
    POOL_MODES,
    candidate_layers,
    default_layers,
    extract_features,
)
from convlens_linear._protocol import evaluate, make_splits, result_table

__all__ = ["LinearProbe", "PAPER_PROTOCOL", "EMBEDDED_PROTOCOL"]

#: Defaults with ``--data``: the Caltech-101 protocol of Sec. 5.2 (Table 4).
PAPER_PROTOCOL: dict[str, Any] = {
    "train_per_class": [15, 30],
    "test_per_class": 50,
    "folds": 5,
    "c_grid": list(DEFAULT_C_GRID),
}
#: Defaults on the embedded sets (16 images per class), sized for the demo budget. With at most
#: 80 training images against 1280-9216 dimensions the data are separable and C >= 0.1 gives
#: the same predictions as 0.01 at many times the cost (measured: identical tables).
EMBEDDED_PROTOCOL: dict[str, Any] = {
    "train_per_class": [2, 4, 8],
    "test_per_class": 8,
    "folds": 3,
    "c_grid": [1e-5, 1e-4, 1e-3, 1e-2],
}


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in parse_str_list(text)]
    except ValueError:
        raise ConvlensError(f"--c-grid {text!r}: expected numbers like 1e-3,0.1,10") from None
    if not values or any(not v > 0 for v in values):
        raise ConvlensError(f"--c-grid {text!r}: expected positive numbers")
    return values


def _setup_distributed(device: torch.device) -> tuple[torch.device, bool]:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1) join the process group (NCCL on GPUs, else gloo)
    and use this rank's GPU; returns the device and whether the group was created here."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device, False
    import torch.distributed as dist

    created = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        created = True
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device, created


class LinearProbe(Probe):
    """Linear probes per layer: features of several layers over a labelled image set, a softmax
    and a linear SVM trained on K images per class, accuracy on held-out images over seeded
    folds; a Table 7-style table and a Fig. 9-style curve."""

    name = "linear"
    summary = "Linear probes per layer: softmax / linear SVM on frozen features (Table 7, Fig. 9)"
    paper = "Sec. 5.2-5.3, Tables 4, 5, 7, Fig. 9"
    needs_images = False
    options = (
        Option(
            "data",
            Path,
            None,
            "Labelled images in ImageFolder layout (ROOT/<class>/<image>). "
            "Default: an embedded set (see --embedded).",
        ),
        Option(
            "embedded",
            str,
            "photo-views",
            "Embedded set used when --data is not given.",
            choices=tuple(EMBEDDED),
        ),
        Option(
            "layers",
            str,
            None,
            "Comma-separated layers (names or aliases), 'all', or "
            "default: 4 stage outputs spread through the network (zfnet/alexnet: conv1-5, "
            "pool5, fc6, fc7).",
        ),
        Option("classifier", str, "softmax,svm", "Comma-separated classifiers: softmax, svm."),
        Option(
            "train_per_class",
            str,
            None,
            "Training images per class, e.g. 15,30 (each gives "
            "a point of the curve). Default: 15,30 with --data, 2,4,8 embedded.",
        ),
        Option(
            "test_per_class",
            int,
            None,
            "Test images per class, at most. Default: 50 with --data, 8 embedded.",
            min=1,
        ),
        Option(
            "folds",
            int,
            None,
            "Random train/test folds. Default: 5 with --data, 3 embedded.",
            min=1,
        ),
        Option(
            "cv_folds",
            int,
            3,
            "Cross-validation folds within the training images, to choose C.",
            min=2,
        ),
        Option(
            "c_grid",
            str,
            None,
            "Regularisation values tried (scikit-learn's C). Default: "
            + ",".join(f"{c:g}" for c in DEFAULT_C_GRID)
            + " with --data, 1e-5,1e-4,1e-3,"
            "1e-2 embedded.",
        ),
        Option(
            "pool",
            str,
            "auto",
            "Map -> vector: none (flatten, as the paper), avg/max "
            "(adaptive pooling to a grid), auto (flatten up to --max-dim values, else avg).",
            choices=POOL_MODES,
        ),
        Option(
            "grid",
            int,
            0,
            "Pooling grid side for avg/max; 0: the largest with C*g*g <= "
            "--max-dim; 1: global pooling.",
            min=0,
        ),
        Option(
            "max_dim", int, DEFAULT_MAX_DIM, "Feature size kept whole under --pool auto.", min=1
        ),
        Option("batch_size", int, 32, "Images per forward pass.", min=1),
        Option(
            "shard_size",
            int,
            256,
            "Images per cache shard (the unit of resuming and of the split across torchrun ranks).",
            min=1,
        ),
        Option(
            "workers", int, 0, "Image-loading worker processes (0: load in this process).", min=0
        ),
        Option("cache", Path, None, "Feature cache folder. Default: OUT/.cache/linear."),
    )

    # -- run -----------------------------------------------------------------------------------

    def run(self, ctx: ProbeContext) -> ProbeResult:
        o = ctx.options
        t0 = time.perf_counter()
        # outside the probe's own folder (that one is swapped whole at the end of a run), so an
        # interrupted run resumes from its shards
        out_root = ctx.report_dir or ctx.out_dir.parent
        cache_root = Path(o["cache"]) if o["cache"] else out_root / ".cache" / "linear"
        if o["data"] is not None:
            dataset = scan_image_folder(o["data"])
            embedded, proto = None, PAPER_PROTOCOL
        else:
            embedded, proto = o["embedded"], EMBEDDED_PROTOCOL
            folder = embedded_dataset(embedded, cache_root)
            dataset = scan_image_folder(folder, name=f"embedded:{embedded}")
        ks = parse_int_list(o["train_per_class"], "--train-per-class") or proto["train_per_class"]
        ks = sorted(set(ks))
        test_k = o["test_per_class"] if o["test_per_class"] is not None else proto["test_per_class"]
        folds = o["folds"] if o["folds"] is not None else proto["folds"]
        classifiers = parse_str_list(o["classifier"]) or list(CLASSIFIERS)
        for kind in classifiers:
            if kind not in CLASSIFIERS:
                raise ConvlensError(f"--classifier {kind!r}: expected softmax and/or svm")
        c_grid = _floats(o["c_grid"]) if o["c_grid"] else list(proto["c_grid"])
        if o["cv_folds"] < 2:
            raise ConvlensError(f"--cv-folds {o['cv_folds']}: must be at least 2")

        model = ctx.model
        device, created = _setup_distributed(ctx.device)
        if device != ctx.device:
            model.to(device)
        pre = ctx.preprocess or Preprocess.for_model(model)
        x0 = torch.zeros((1, 3, *pre.input_size), device=device)
        spec = (o["layers"] or "").strip()
        if spec.lower() == "all":
            layers = candidate_layers(model, x0)
        elif spec:
            layers = list(dict.fromkeys(parse_str_list(spec)))
        else:
            layers = default_layers(model, x=x0)
        info = getattr(model, "convlens_info", None)
        try:
            feats = extract_features(
                model,
                dataset,
                layers,
                pre,
                cache_dir=cache_root / "features",
                pool=o["pool"],
                grid=o["grid"],
                max_dim=o["max_dim"],
                batch_size=o["batch_size"],
                shard_size=o["shard_size"],
                workers=o["workers"],
                device=device,
                model_name=getattr(info, "name", None) or ctx.model_name,
                progress=ctx.progress,
            )
        finally:
            if created:
                import torch.distributed as dist

                dist.destroy_process_group()
        splits = make_splits(
            dataset.labels,
            ks,
            test_k,
            folds,
            ctx.seed,
            o["cv_folds"],
            valid=feats.valid,
            class_names=dataset.classes,
        )
        t1 = time.perf_counter()
        results = evaluate(
            {la: feats[la] for la in layers},
            dataset.labels,
            splits,
            classifiers,
            c_grid,
            device=device,
            progress=ctx.progress,
        )
        t2 = time.perf_counter()
        table = result_table(results)
        rank, world = feats.rank, feats.world_size
        data = {
            "probe": self.name,
            "paper": "Zeiler & Fergus 2014, Sec. 5.2-5.3, Tables 4, 5, 7, Fig. 9",
            # a model passed as an object is labelled by its class; its registry name is better
            "model": getattr(info, "name", None) or ctx.model_name,
            "weights": str(getattr(info, "weights", None) or "unknown"),
            "seed": ctx.seed,
            "dataset": {
                "name": dataset.name,
                "embedded": embedded,
                "root": str(dataset.root),
                "classes": list(dataset.classes),
                "n_images": len(dataset),
                "paths": dataset.relative_paths(),
                "labels": dataset.labels.tolist(),
                "skipped": feats.skipped,
            },
            "preprocess": pre.to_dict(),
            "layers": [feats.layers[la].to_dict() for la in layers],
            "protocol": {
                "train_per_class": ks,
                "test_per_class": test_k,
                "folds": folds,
                "cv_folds": o["cv_folds"],
                "c_grid": sorted(c_grid),
                "classifiers": classifiers,
                "metric": "mean of per-class accuracies on the test images (%), mean and "
                "population std (ddof=0) over folds",
                "split_rule": "rng = numpy.random.default_rng([seed, K, fold]); for each class "
                "in order: perm = rng.permutation(readable image indices of the class, "
                "ascending); train = perm[:K]; test = perm[K:K+test_per_class]",
                "cv_rule": "the i-th training image of each class is in CV fold i mod "
                "min(cv_folds, K); C = the grid value with the best mean balanced accuracy over "
                "the CV folds, ties to the smallest C; standardisation fitted on the CV-train "
                "rows; K = 1: no CV, C = the middle grid value (the lower of two)",
                "objective": "mean loss + ||W||^2 / (2 C n) on standardised features (bias not "
                "penalised); softmax: multinomial cross-entropy; svm: one-vs-rest squared hinge",
            },
            "results": [r.to_dict() for r in results],
            "table": table,
            "splits": [s.to_dict() for s in splits],
            "timing": {
                "extract_s": feats.seconds,
                "classify_s": t2 - t1,
                "total_s": time.perf_counter() - t0,
                "shards": feats.n_shards,
                "shards_computed": feats.computed_shards,
                "from_cache": feats.from_cache,
            },
            "distributed": {"world_size": world, "rank": rank},
            "device": str(device),
        }
        files = [write_json(ctx.out_dir / "linear.json", data)]
        best = max(results, key=lambda r: (r.k, r.mean))
        summary = {
            "dataset": dataset.name,
            "classes": len(dataset.classes),
            "images": len(dataset),
            "layers": ",".join(layers),
            "best": f"{best.classifier} ({best.layer}) {best.k}/class: "
            f"{best.mean:.1f} ± {best.std:.1f} %",
            "extract_s": round(feats.seconds, 2),
            "features_from_cache": feats.from_cache,
        }
        return ProbeResult(self.name, summary=summary, files=files, data=data)

    # -- output ---------------------------------------------------------------------------------

    def describe(self, result: ProbeResult) -> list[tuple[str, str]]:
        d = result.data
        p = d["protocol"]
        rows = [
            (
                "dataset",
                f"{d['dataset']['name']}: {len(d['dataset']['classes'])} classes, "
                f"{d['dataset']['n_images']} images",
            ),
            (
                "protocol",
                f"{','.join(map(str, p['train_per_class']))} train/class, ≤"
                f"{p['test_per_class']} test/class, {p['folds']} folds, seed "
                f"{d['seed']}; mean per-class accuracy % (± std over folds)",
            ),
            ("table", "  ".join(d["table"]["columns"])),
        ]
        dims = {la["layer"]: la["dim"] for la in d["layers"]}
        for row in d["table"]["rows"]:
            label = f"{row['classifier']} ({row['layer']}, {dims.get(row['layer'], '?')}-d)"
            rows.append((label, "  ".join(row["cells"])))
        t = d["timing"]
        rows.append(
            (
                "features",
                f"{t['extract_s']:.1f} s "
                f"({'read from cache' if t['from_cache'] else 'extracted'}), "
                f"classifiers {t['classify_s']:.1f} s",
            )
        )
        rows.append(("files", ", ".join(Path(f).name for f in result.files)))
        return rows

    def render(self, result: ProbeResult, ctx: ProbeContext) -> ReportSection:
        d = result.data
        png = _plot(d, ctx.out_dir / "linear.png")
        result.files.append(png)
        t = d["table"]
        head = "".join(f"<th>{esc(c)}</th>" for c in t["columns"])
        body = "".join(
            f"<tr><td>{esc(r['classifier'])} ({esc(r['layer'])})</td>"
            + "".join(f"<td>{esc(c)}</td>" for c in r["cells"])
            + "</tr>"
            for r in t["rows"]
        )
        dims = ", ".join(
            f"{esc(la['layer'])}: {la['dim']}-d"
            + (f" ({la['pool']} to {la['grid'][0]}x{la['grid'][1]})" if la["grid"] else "")
            for la in d["layers"]
        )
        p = d["protocol"]
        html = (
            f"<p>Linear classifiers on frozen features of <b>{esc(d['model'])}</b> "
            f"(Sec. 5.2-5.3 of the paper): dataset <code>{esc(d['dataset']['name'])}</code>, "
            f"{len(d['dataset']['classes'])} classes, {d['dataset']['n_images']} images; "
            f"{esc(','.join(map(str, p['train_per_class'])))} training images per class, up to "
            f"{p['test_per_class']} test images per class, {p['folds']} seeded folds "
            f"(seed {d['seed']}). Cells: mean of per-class accuracies in %, ± std over folds "
            "(Table 7 of the paper).</p>"
            f"<table><tr><th>classifier (layer)</th>{head}</tr>{body}</table>"
            f"<p class='meta'>Features: {dims}.</p>"
            f"<figure><img src='{self.name}/{png.name}' alt='accuracy against training images "
            "per class and against depth'><figcaption>Left: accuracy against training images "
            "per class (Fig. 9 of the paper). Right: accuracy against depth for the largest "
            "training size (Table 7).</figcaption></figure>"
        )
        return ReportSection("Linear probes per layer", html, [f"{self.name}/{png.name}"], order=60)


def _plot(d: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = d["results"]
    layers = [la["layer"] for la in d["layers"]]
    kinds = d["protocol"]["classifiers"]
    ks = d["protocol"]["train_per_class"]
    styles = {"softmax": "-", "svm": "--"}
    colors = plt.get_cmap("viridis")(np.linspace(0.0, 0.9, max(1, len(layers))))
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.4))
    for kind in kinds:
        for la, color in zip(layers, colors, strict=True):
            rs = sorted(
                (r for r in results if r["layer"] == la and r["classifier"] == kind),
                key=lambda r: r["k"],
            )
            left.errorbar(
                [r["k"] for r in rs],
                [r["mean_pct"] for r in rs],
                yerr=[r["std_pct"] for r in rs],
                color=color,
                linestyle=styles.get(kind, "-"),
                marker="o",
                ms=3,
                capsize=2,
                label=f"{kind} ({la})",
            )
        top = [
            next(
                r
                for r in results
                if r["layer"] == la and r["classifier"] == kind and r["k"] == ks[-1]
            )
            for la in layers
        ]
        right.errorbar(
            range(len(layers)),
            [r["mean_pct"] for r in top],
            yerr=[r["std_pct"] for r in top],
            linestyle=styles.get(kind, "-"),
            marker="o",
            capsize=2,
            label=kind,
        )
    left.set_xlabel("training images per class")
    left.set_ylabel("mean per-class accuracy (%)")
    left.set_title("Accuracy vs training size (cf. Fig. 9)")
    left.set_xticks(ks)
    left.grid(alpha=0.3)
    # beside the panel, never over a curve
    left.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    right.set_xticks(range(len(layers)))
    right.set_xticklabels(layers, rotation=20, ha="right", fontsize=8)
    right.set_ylabel("mean per-class accuracy (%)")
    right.set_title(f"Accuracy vs layer, {ks[-1]}/class (cf. Table 7)")
    right.grid(alpha=0.3)
    right.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.suptitle(f"{d['model']} on {d['dataset']['name']}", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
