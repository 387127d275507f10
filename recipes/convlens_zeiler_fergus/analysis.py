"""The trained model under the probes: Figs. 2, 4-7 and Tables 1, 4-7 of the paper, plus the
recipe's own figures (first-layer filters as Fig. 6(c), their evolution, the training curves).

    from convlens_zeiler_fergus.analysis import load_trained, analyse_run
    model = load_trained("runs/zeiler-fergus/zfnet/model.pt")   # takes 0-255 RGB, ready for probes
    convlens probe occlusion --model zfnet --weights runs/zeiler-fergus/zfnet/model.pt  # raw net

The network was trained on pixel values minus the per-pixel mean image (Section 3), which no
per-channel ``mean``/``std`` can express. :func:`probe_model` therefore returns the same network
(same module names and aliases: ``features.conv1`` … ``classifier.fc8``, ``conv1`` … ``fc8``)
with the mean image as a buffer subtracted at the top of ``forward``, and ``convlens_info`` saying
"scale RGB to 0–255, resize the short side to S, centre-crop C": exactly the training input,
so every probe sees what the network was trained on. The mean image's per-channel average goes
into ``convlens_info.mean`` (so "zero" in model space is the dataset's mean colour, the grey of
occluders), the per-pixel rest into the buffer ``input_mean``.

The probes are called through the plugin system (``convlens.run_probe``); a probe that is not
installed or that fails is skipped with a note in the report, never silently.
"""

from __future__ import annotations

import math
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from convlens.data import Preprocess
from convlens.errors import ConvlensError
from convlens.io import atomic_path, write_json
from convlens.models import AlexNet, ModelInfo, ZFNet, imagenet_class_names
from convlens.render import grid, save_png
from convlens_zeiler_fergus.checkpoint import load_checkpoint
from convlens_zeiler_fergus.experiments import model_from_dict

__all__ = [
    "PixelMeanZFNet",
    "PixelMeanAlexNet",
    "probe_model",
    "probe_preprocess",
    "load_trained",
    "render_filters",
    "render_filter_evolution",
    "plot_curves",
    "run_probes",
    "run_feature_evolution",
    "DEFAULT_PROBES",
]

DEFAULT_PROBES = ("deconv", "occlusion", "correspondence", "invariance", "linear")


class _PixelMean:
    """Subtracts ``input_mean`` (the per-pixel mean image minus its per-channel average, 0-255
    units) before the network's first layer. The per-channel average itself is removed by the
    preprocessing (``convlens_info.mean``), so that "zero in model space" is the dataset's mean
    colour, as grey occluders and masks expect. No shape-dependent branches: ``torch.fx`` traces
    it (the occlusion probe's incremental path needs that)."""

    input_mean: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x - self.input_mean)  # type: ignore[misc]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward_features(x - self.input_mean)  # type: ignore[misc]


class PixelMeanZFNet(_PixelMean, ZFNet):
    """:class:`~convlens.models.ZFNet` taking 0–255 RGB, minus the training mean image."""


class PixelMeanAlexNet(_PixelMean, AlexNet):
    """:class:`~convlens.models.AlexNet` taking 0–255 RGB, minus the training mean image."""


def _crop_pct(crop: int, size: int) -> float:
    pct = crop / size
    if math.floor(crop / pct) != size:  # float round-off must not shrink the resize
        pct = crop / (size + 0.25)
    return pct


def probe_preprocess(crop: int, size: int, channel_mean: Sequence[float]) -> Preprocess:
    """The probes' input transform: short side → ``size``, centre ``crop``, RGB in 0-255 minus
    the mean image's per-channel average ``channel_mean`` (0-255 units)."""
    return Preprocess(
        input_size=(crop, crop),
        resize=size,
        mean=tuple(float(m) / 255.0 for m in channel_mean),
        std=(1 / 255.0,) * 3,
        interpolation="bilinear",
    )


def _class_names(classes: Sequence[str]) -> tuple[str, ...]:
    if len(classes) == 1000 and all(c.startswith("n") and c[1:].isdigit() for c in classes):
        return imagenet_class_names()  # ImageNet wnids, sorted: the standard index order
    return tuple(classes)


def probe_model(
    model: nn.Module,
    mean_image: torch.Tensor,
    classes: Sequence[str],
    weights: str = "trained",
    name: str = "zeiler-fergus",
) -> nn.Module:
    """``model`` (a trained ZFNet/AlexNet) as the probes should see it (module docstring): a copy
    that subtracts the centre crop of ``mean_image`` itself, in eval mode, with ``convlens_info``.
    """
    cls = PixelMeanAlexNet if isinstance(model, AlexNet) else PixelMeanZFNet
    net = cls(model.config)
    net.load_state_dict(model.state_dict())
    size, crop = int(mean_image.shape[-1]), int(model.config.input_size)
    o = (size - crop) // 2
    centre = mean_image[None, :, o : o + crop, o : o + crop].float()
    channel_mean = mean_image.float().mean(dim=(1, 2))
    net.register_buffer("input_mean", (centre - channel_mean[None, :, None, None]).clone())
    net.convlens_info = ModelInfo(
        name=name,
        family="alexnet" if cls is PixelMeanAlexNet else "zfnet",
        weights=weights,
        random_init=False,
        num_classes=int(model.config.num_classes),
        input_size=(3, crop, crop),
        mean=tuple(float(m) / 255.0 for m in channel_mean),
        std=(1 / 255.0,) * 3,
        interpolation="bilinear",
        crop_pct=_crop_pct(crop, size),
        class_names=_class_names(classes),
    )
    p = next(model.parameters())
    return net.to(p.device).eval()


def load_trained(path: str | Path, for_probes: bool = True) -> nn.Module:
    """A trained model from ``model.pt``, ``checkpoints/last.pt`` or a snapshot. With
    ``for_probes`` it takes 0–255 RGB (:func:`probe_model`), else mean-subtracted input."""
    ckpt = load_checkpoint(path)
    net = model_from_dict(ckpt["model_config"])
    net.load_state_dict(ckpt["model"])
    net.eval()
    if not for_probes:
        return net
    mean = ckpt.get("mean_image")
    if mean is None:
        raise ConvlensError(f"{path}: holds no mean image (a snapshot? pass the run's model.pt)")
    return probe_model(net, mean, ckpt.get("classes") or [], weights=str(path))


# --------------------------------------------------------------------------------------------
# The recipe's own figures
# --------------------------------------------------------------------------------------------


def _filter_tiles(weight: torch.Tensor, n: int | None = None) -> list[np.ndarray]:
    """Each RGB filter contrast-stretched on its own around zero (as Fig. 6 shows them)."""
    w = weight.detach().float().cpu()
    if w.shape[1] != 3:
        raise ConvlensError(f"first-layer filters must see 3 channels, got {tuple(w.shape)}")
    tiles = []
    for f in w[: n or len(w)]:
        a = f.permute(1, 2, 0).numpy()
        scale = max(float(np.abs(a).max()), 1e-12)
        tiles.append(np.clip(0.5 + a / (2 * scale), 0, 1))
    return tiles


def render_filters(
    weight: torch.Tensor, path: str | Path, ncol: int | None = None, scale: int | None = None
) -> Path:
    """The first conv layer's filters as an RGB grid (Fig. 6(c))."""
    tiles = _filter_tiles(weight)
    ncol = ncol or int(math.ceil(math.sqrt(len(tiles))))
    k = int(weight.shape[-1])
    return save_png(grid(tiles, ncol, pad=1), path, scale=scale or max(1, 64 // k))


def render_filter_evolution(
    snapshots: Sequence[tuple[str, torch.Tensor]], path: str | Path, n: int = 16
) -> Path:
    """conv1's first ``n`` filters (columns) at each snapshot (rows)."""
    rows = [t for _, w in snapshots for t in _filter_tiles(w, n)]
    k = int(snapshots[0][1].shape[-1])
    ncol = min(n, int(snapshots[0][1].shape[0]))
    return save_png(grid(rows, ncol, pad=1), path, scale=max(1, 48 // k))


def plot_curves(metrics: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Training loss per logged step and validation top-1/top-5 error per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in metrics if r.get("kind") == "step"]
    epochs = [r for r in metrics if r.get("kind") == "epoch"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.2), dpi=100)
    if steps:
        a1.plot([r["global_step"] for r in steps], [r["loss"] for r in steps], lw=1)
    a1.set_xlabel("step")
    a1.set_ylabel("training loss")
    a1.grid(alpha=0.3)
    if epochs:
        e = [r["epoch"] for r in epochs]
        a2.plot(e, [r["val_top1_err"] for r in epochs], "o-", label="val top-1")
        a2.plot(e, [r["val_top5_err"] for r in epochs], "s-", label="val top-5")
        a2.legend()
    a2.set_xlabel("epoch")
    a2.set_ylabel("error (%)")
    a2.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# Probes through the plugin system
# --------------------------------------------------------------------------------------------


def run_probes(
    model: nn.Module,
    images: Sequence[Path],
    out: Path,
    device: torch.device | str,
    names: Sequence[str] = DEFAULT_PROBES,
    seed: int = 0,
    log: Callable[[str], None] = lambda s: None,
    options: dict[str, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Run each named probe on ``model`` and ``images`` into ``out`` (``out/<probe>/``,
    ``out/index.html``), with ``options[name]`` as its options. ``correspondence`` gets no
    images unless its options name ``parts`` (it then masks its embedded faces, the stand-in
    for the paper's dog faces). Returns one record per probe: ``status`` ``ok`` (with its
    summary and options), ``not installed`` or ``failed`` (with the one-line error)."""
    import time

    import convlens
    from convlens.plugins import get_host

    available = get_host().probes
    records = []
    for name in names:
        if name not in available:
            records.append({"probe": name, "status": "not installed"})
            log(f"probe {name}: not installed, skipped")
            continue
        t0 = time.perf_counter()
        opts = dict((options or {}).get(name, {}))
        imgs = None if name == "correspondence" and "parts" not in opts else list(images)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", category=UserWarning)
                result = convlens.run_probe(
                    name, model=model, images=imgs, out=out, device=device, seed=seed, **opts
                )
            records.append(
                {
                    "probe": name,
                    "status": "ok",
                    "seconds": time.perf_counter() - t0,
                    "options": _jsonable(opts),
                    "images": "embedded" if imgs is None else [str(p) for p in imgs],
                    "summary": _jsonable(result.summary),
                }
            )
            log(f"probe {name}: ok ({time.perf_counter() - t0:.1f} s)")
        except Exception as e:  # a failing plugin must not lose the trained model's report
            line = str(e).strip().splitlines()[0] if str(e).strip() else ""
            records.append(
                {
                    "probe": name,
                    "status": "failed",
                    "error": f"{type(e).__name__}: {line}",
                    "traceback": traceback.format_exc(limit=4),
                }
            )
            log(f"probe {name}: failed ({type(e).__name__}: {line})")
    write_json(out / "probes.json", {"probes": records})
    return records


def _jsonable(obj: Any) -> Any:
    import json

    return json.loads(json.dumps(obj, default=lambda o: getattr(o, "tolist", lambda: str(o))()))


def run_feature_evolution(
    snapshots: Sequence[tuple[str, nn.Module]],
    inputs: torch.Tensor,
    layers: Sequence[str],
    channels_per_layer: int,
    out_dir: Path,
    preprocess: Preprocess,
    seed: int = 0,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Fig. 4 through the deconv plugin's ``feature_evolution``, one figure per layer, for a
    seeded random subset of each layer's features. Returns ``{"status", "figures", ...}``."""
    try:
        from convlens_deconv import feature_evolution
    except ImportError as e:
        log("Fig. 4: the deconv plugin's feature_evolution is not available, skipped")
        return {"status": "not available", "error": str(e).splitlines()[0] if str(e) else ""}
    rng = np.random.default_rng(seed)
    figures, results = [], {}
    net = snapshots[-1][1]
    widths = {t.alias: t.channels for t in getattr(net, "feature_info", [])}
    for layer in layers:
        if layer not in widths:
            continue
        chans = sorted(
            rng.choice(
                widths[layer], size=min(channels_per_layer, widths[layer]), replace=False
            ).tolist()
        )
        png = out_dir / f"evolution_{layer}.png"
        try:
            res = feature_evolution(snapshots, inputs, layer, chans, png, preprocess=preprocess)
        except Exception as e:  # the plugin is someone else's: report, keep going
            line = str(e).strip().splitlines()[0] if str(e).strip() else ""
            log(f"Fig. 4 {layer}: failed ({type(e).__name__}: {line})")
            return {"status": "failed", "error": f"{type(e).__name__}: {line}", "figures": figures}
        figures.append(str(png))
        results[layer] = {"channels": chans, "result": _jsonable(res)}
    return {"status": "ok", "figures": figures, "layers": results}
