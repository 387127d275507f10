"""``convlens demo``: the main job on the embedded default — every installed probe on the
ImageNet-pretrained EfficientNet-Lite0 and the bundled photos, into one report, plus a small
atlas (``convlens atlas``: the embedded mining set, two layers, 32 units in all) linked from it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from convlens.cli._console import err, out, progress_bar, show_note
from convlens.runner import DEFAULT_MODEL


def demo(
    model: Annotated[str, typer.Option("--model", "-m", help="Model name.")] = DEFAULT_MODEL,
    images: Annotated[
        list[Path] | None, typer.Option("--images", "-i", help="Images (default: bundled photos).")
    ] = None,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path(
        "convlens-out"
    ),
    probes: Annotated[
        str | None, typer.Option("--probes", help="Comma-separated probe names (default: all).")
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda[:N].")] = "auto",
    atlas: Annotated[
        bool,
        typer.Option("--atlas/--no-atlas", help="Also a small atlas (2 layers, 16 units each)."),
    ] = True,
) -> None:
    """Run every installed probe with its defaults and write OUT/index.html."""
    from convlens.io import check_writable_dir
    from convlens.output import output_lock

    check_writable_dir(out_dir)  # before any work
    with output_lock(out_dir):  # the whole demo is one run of this output folder
        _run_demo(model, images, out_dir, probes, device, atlas)


#: The demo's atlas: units 0..DEMO_UNITS-1 of two of the default layers (32 units in all), on the
#: embedded set; the second and fourth of the five default layers (receptive fields ~8% and ~37%
#: of the input on efficientnet_lite0).
DEMO_UNITS = 16


def _demo_atlas(net, out_dir: Path, dev, images) -> None:
    """The small atlas: the demo's ``--images`` when given, else the embedded mining set."""
    from convlens.cli.atlas import run_atlas
    from convlens.engine import depth_layers

    layers = [lay for lay, _ in depth_layers(net)]
    two = [layers[1], layers[3]] if len(layers) >= 4 else layers[:2]
    run_atlas(net, out_dir, images=[str(p) for p in images] if images else None, layers=two, units=f"0-{DEMO_UNITS - 1}", device=dev,
              checkpoint_every=0, progress_factory=progress_bar, note_sink=show_note,
              report=False)  # fmt: skip


def _run_demo(model, images, out_dir: Path, probes, device, atlas: bool = True) -> None:
    from convlens.errors import ConvlensError
    from convlens.options import parse_str_list
    from convlens.plugins import get_host
    from convlens.probe import ProbeContext
    from convlens.render.report import build_report
    from convlens.runner import load_model, resolve_device, run_probe, write_overview

    host = get_host()
    names = parse_str_list(probes) or host.probes.names()
    for n in names:
        host.probes.get(n)  # unknown names fail before any work
    dev = resolve_device(device)
    net, label = load_model(model, device=dev, host=host)
    from convlens.data import default_images

    image_paths = [Path(p) for p in images] if images else list(default_images())
    ctx = ProbeContext(net, label, image_paths, out_dir / "overview", {}, dev)
    err.print(
        f"[bold]convlens demo[/]: model {label}, {len(image_paths)} image source(s), "
        f"probes: {', '.join(names) or 'none installed'}"
    )
    t0 = time.perf_counter()
    write_overview(ctx, out_dir)
    failed = []
    for n in names:
        t = time.perf_counter()
        try:
            run_probe(
                n,
                net,
                images=[Path(p) for p in images] if images else None,
                out=out_dir,
                device=dev,
                host=host,
                progress_factory=progress_bar,
                overview=False,
                note_sink=show_note,
            )
            err.print(f"  [green]✓[/] {n} ({time.perf_counter() - t:.1f} s)")
        except ConvlensError as exc:
            failed.append(n)
            err.print(f"  [red]✗[/] {n}: {exc}")
    if atlas:
        t = time.perf_counter()
        try:
            _demo_atlas(net, out_dir, dev, images)
            err.print(f"  [green]✓[/] atlas ({time.perf_counter() - t:.1f} s)")
        except ConvlensError as exc:
            failed.append("atlas")
            err.print(f"  [red]✗[/] atlas: {exc}")
    report = build_report(out_dir, meta={"model": label})
    out.print(f"report:  {report}")
    out.print(f"results: {out_dir}/<probe>/ (JSON, NPZ, PNG) — {time.perf_counter() - t0:.1f} s")
    if failed:
        raise ConvlensError(f"probe(s) failed in the demo: {', '.join(failed)}")
