"""The smallest convlens plugin: ``convlens probe hello``.

For each image it reports the model's top-1 class and the mean activation of one layer (the
model's top convolutional layer unless ``--layer`` is given), using the engine's recorder.
Install with ``pip install -e examples/convlens-hello-probe``; it then shows in
``convlens plugins`` and runs as ``convlens probe hello``.
"""

from __future__ import annotations

import torch

import convlens
from convlens.engine import top_conv_layer
from convlens.io import write_json


class HelloProbe(convlens.Probe):
    name = "hello"
    summary = "Top-1 class and mean activation of one layer per image"
    options = (
        convlens.Option("layer", str, None, "Layer to average (default: top conv layer)."),
        convlens.Option("greeting", str, "hello", "Word printed before each image name."),
    )

    def run(self, ctx: convlens.ProbeContext) -> convlens.ProbeResult:
        x, paths = ctx.inputs()
        layer = ctx.options["layer"] or top_conv_layer(ctx.model)
        with torch.inference_mode(), convlens.record(ctx.model, [layer], trace=False) as rec:
            logits = ctx.model(x.to(ctx.device))
        means = rec[layer].float().flatten(1).mean(1).tolist()
        rows = [
            {"image": str(p), "top1": int(c), "mean_activation": m}
            for p, c, m in zip(paths, logits.argmax(1).tolist(), means, strict=True)
        ]
        path = write_json(ctx.out_dir / "hello.json", {"layer": layer, "images": rows})
        summary = {
            f"{ctx.options['greeting']} {p.name}": r["top1"]
            for p, r in zip(paths, rows, strict=True)
        }
        return convlens.ProbeResult(self.name, {"layer": layer, **summary}, [path], rows)

    def render(self, result, ctx):
        items = "".join(f"<li>{r['image']}: class {r['top1']}</li>" for r in result.data)
        return convlens.ReportSection("Hello", f"<ul>{items}</ul>", order=90)


@convlens.hookimpl
def convlens_register_probes(registry):
    registry.register(HelloProbe.name, HelloProbe)
