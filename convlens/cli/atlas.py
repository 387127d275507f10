"""``convlens atlas``: Fig. 2 for every unit of a model over a dataset, as a static site.

    convlens atlas --model efficientnet_lite0 --images photos/ --out out
    convlens atlas --model vgg16 --images 'shards/train-{000..009}.tar' --layers conv3,conv5
    torchrun --nproc-per-node 2 -m convlens atlas --images data/ --out out

Writes ``OUT/atlas/`` (``index.html`` and the pages, ``atlas.json``, one ``layer.json`` per
layer, ``run.json``), adds a section linking it to ``OUT/index.html``. The work is done by the
``convlens_atlas`` package (``docs/atlas.md``).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from convlens.cli._console import out, progress_bar, show_note
from convlens.cli.probe import model_kwargs, model_params
from convlens.runner import DEFAULT_MODEL

__all__ = ["atlas", "run_atlas"]


def _params() -> list[inspect.Parameter]:
    kw = inspect.Parameter.KEYWORD_ONLY
    opt = typer.Option
    return [
        inspect.Parameter("model", kw, default=DEFAULT_MODEL, annotation=Annotated[
            str, opt("--model", "-m", help="Model name (convlens, plugin or any timm "
                     "architecture).")]),
        inspect.Parameter("weights", kw, default=None, annotation=Annotated[
            Path | None, opt("--weights", help="Weights: .safetensors or a torch checkpoint "
                             "(weights_only).")]),
        inspect.Parameter("images", kw, default=None, annotation=Annotated[
            list[str] | None, opt("--images", "-i", help="DATASET: folders (any depth, "
                                  "ImageFolder or flat), image files, WebDataset-style .tar "
                                  "shards or brace patterns like 'train-{000..009}.tar'; "
                                  "repeatable. Default: the embedded mining set.")]),
        inspect.Parameter("layers", kw, default=None, annotation=Annotated[
            str | None, opt("--layers", help="Layers, comma-separated (aliases, module names). "
                            "Default: about five spread by receptive-field size.")]),
        inspect.Parameter("units", kw, default="all", annotation=Annotated[
            str, opt("--units", help="Units of each layer: 'all' or ranges like 0-63,100.")]),
        inspect.Parameter("top", kw, default=9, annotation=Annotated[
            int, opt("--top", min=1, help="Top-k activations per unit, each from a different "
                     "image (Fig. 2: 9).")]),
        inspect.Parameter("rule", kw, default="auto", annotation=Annotated[
            str, opt("--rule", help="Backward rule: auto, deconvnet, guided or gradient (as "
                     "in convlens probe deconv).")]),
        inspect.Parameter("batch_size", kw, default=32, annotation=Annotated[
            int, opt("--batch-size", min=1, help="Images per forward pass in pass 1.")]),
        inspect.Parameter("checkpoint_every", kw, default=1000, annotation=Annotated[
            int, opt("--checkpoint-every", min=0, help="Pass 1 saves its state every N images "
                     "(0: never); a killed run started again resumes from it.")]),
        inspect.Parameter("resume", kw, default=True, annotation=Annotated[
            bool, opt("--resume/--no-resume", help="Continue from a matching pass-1 "
                      "checkpoint in OUT (default) or start afresh.")]),
        inspect.Parameter("out_dir", kw, default=Path("convlens-out"), annotation=Annotated[
            Path, opt("--out", "-o", help="Output folder (the atlas goes to OUT/atlas).")]),
        inspect.Parameter("device", kw, default="auto", annotation=Annotated[
            str, opt("--device", help="auto, cpu or cuda[:N].")]),
        inspect.Parameter("seed", kw, default=0, annotation=Annotated[
            int, opt("--seed", help="Random seed (recorded).")]),
        *model_params(),
    ]  # fmt: skip


def run_atlas(
    model: Any,
    out_dir: Path,
    *,
    images: list[str] | None = None,
    layers: str | list[str] | None = None,
    units: str | None = "all",
    top: int = 9,
    rule: str = "auto",
    batch_size: int = 32,
    checkpoint_every: int = 1000,
    resume: bool = True,
    device: str = "auto",
    seed: int = 0,
    weights: Path | None = None,
    progress_factory=None,
    note_sink=None,
    report: bool = True,
    model_kw: dict[str, Any] | None = None,
):
    """The command's work, callable from Python and the demo: load the model, build the atlas in a
    staging folder swapped in for ``OUT/atlas`` when complete (under ``OUT``'s lock), write its
    report section and ``run.json``, rebuild ``OUT/index.html``. Returns the
    :class:`~convlens_atlas.AtlasResult` (None on ranks other than 0)."""
    from convlens.errors import ConvlensError
    from convlens.io import check_writable_dir, write_json
    from convlens.output import LOCK_NAME, output_lock, staged_dir
    from convlens.probe import seed_everything
    from convlens.render.report import build_report
    from convlens.runner import _rank, _weights_record, load_model, resolve_device

    try:
        import convlens_atlas
    except ImportError as exc:  # pragma: no cover - a broken install
        raise ConvlensError(
            f"convlens atlas: the convlens_atlas package is missing ({exc})"
        ) from None
    from convlens_atlas import build_atlas, remove_checkpoints, resolve_units

    if rule not in ("auto", "deconvnet", "guided", "gradient"):
        raise ConvlensError(f"--rule {rule!r}: expected auto, deconvnet, guided or gradient")
    resolve_units(units)  # a bad --units fails before any work
    from convlens.data import open_dataset

    dataset = open_dataset(images) if images else None  # a missing or empty DATASET, too
    out_dir = Path(out_dir)
    fresh = not out_dir.exists()
    check_writable_dir(out_dir)
    model_kw = dict(model_kw or {})
    try:
        dev = resolve_device(device)
        seed_everything(seed)
        net, label = load_model(model, weights=weights, device=dev, **model_kw)
        main = _rank() == 0
        t0 = time.perf_counter()
        key = {"weights": _weights_record(weights, net), "model_kw": json.loads(
            json.dumps(model_kw, default=str))}  # fmt: skip
        ckpt_root = out_dir / convlens_atlas.CHECKPOINT_DIR if checkpoint_every else None
        with contextlib.ExitStack() as held:
            if main:
                held.enter_context(output_lock(out_dir))
                work = held.enter_context(staged_dir(out_dir / "atlas"))
            else:  # other torchrun ranks mine their share and write nothing shared
                import tempfile

                work = Path(held.enter_context(tempfile.TemporaryDirectory(prefix="convlens-")))
            result = build_atlas(
                net, work, model_name=label, images=dataset, layers=layers, units=units, k=top,
                rule=rule, batch_size=batch_size, device=dev, checkpoint_root=ckpt_root,
                checkpoint_every=checkpoint_every, resume=resume, progress=progress_factory,
                note=note_sink, key=key,
            )  # fmt: skip
            if result is None:
                return None
            from convlens_atlas._report import atlas_section

            write_json(
                work / "section.json", {"key": "atlas", **atlas_section(result.doc).to_dict()}
            )
            from convlens import __version__

            timings = {k: round(v, 3) for k, v in result.timings.items()}
            timings["total_s"] = round(time.perf_counter() - t0, 3)
            write_json(work / "run.json", {
                "command": "atlas", "model": label, **key["weights"],
                "model_kw": key["model_kw"], "images": list(images or []), "layers": layers,
                "units": units, "top": top, "rule": rule, "batch_size": batch_size,
                "checkpoint_every": checkpoint_every, "resumed_from_images": result.resumed_from,
                "seed": seed, "device": str(dev), "convlens_version": __version__,
                "timings_s": timings,
            })  # fmt: skip
        if ckpt_root is not None:
            remove_checkpoints(ckpt_root)  # the atlas is in place: nothing left to resume
        if report:
            with output_lock(out_dir):
                build_report(out_dir, meta={"model": label})
        result.out_dir = out_dir / "atlas"
        return result
    except BaseException:
        if fresh:  # a failed first run leaves no folder behind (only its lock file was there)
            left = list(out_dir.iterdir()) if out_dir.is_dir() else []
            if all(p.name == LOCK_NAME for p in left):
                for p in left:
                    p.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    out_dir.rmdir()
        raise


def atlas(**kwargs: Any) -> None:
    """Fig. 2 for every unit of a model over a dataset, as a static site (OUT/atlas/index.html)."""
    base = {k: kwargs.pop(k) for k in [p.name for p in model_params()]}
    mkw = model_kwargs(base)
    t = time.perf_counter()
    result = run_atlas(
        kwargs.pop("model"), kwargs.pop("out_dir"), progress_factory=progress_bar,
        note_sink=show_note, model_kw=mkw, **kwargs,
    )  # fmt: skip
    if result is None:
        return
    n_units = sum(ld["units"] for ld in result.doc["layers"])
    out.print(f"atlas:   {result.out_dir / 'index.html'} ({len(result.doc['layers'])} layers, "
              f"{n_units} units, {result.doc['dataset']['images']} images, "
              f"{time.perf_counter() - t:.1f} s)")  # fmt: skip


atlas.__signature__ = inspect.Signature(_params())  # type: ignore[attr-defined]
