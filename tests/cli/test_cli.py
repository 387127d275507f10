"""The CLI: exit codes, one-line errors, the layers table, probe options from the plugin."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import convlens
from convlens.cli import build_app

runner = CliRunner()


class EchoProbe(convlens.Probe):
    """A test probe: records one layer and reports its mean."""

    name = "echo"
    summary = "mean of one layer"
    options = (
        convlens.Option("layer", str, "conv1", "Layer."),
        convlens.Option("repeat", int, 1, "Times."),
        convlens.Option("mode", str, "mean", "Reduction.", choices=("mean", "max")),
    )

    def run(self, ctx):
        x, _ = ctx.inputs()
        with convlens.record(ctx.model, [ctx.options["layer"]], trace=False) as rec:
            ctx.model(x)
        a = rec[ctx.options["layer"]]
        v = float(a.mean() if ctx.options["mode"] == "mean" else a.max())
        return convlens.ProbeResult(self.name, {"value": v, "repeat": ctx.options["repeat"]})


@pytest.fixture
def app(isolated_host):
    import types

    plugin = types.SimpleNamespace()

    @convlens.hookimpl
    def convlens_register_probes(registry):
        registry.register("echo", EchoProbe)

    plugin.convlens_register_probes = convlens_register_probes
    isolated_host(("echo-plugin", plugin))
    return build_app()


def _one_error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.output
    assert "Traceback" not in result.output
    return errors[0]


def test_layers_zfnet_shapes_and_fields(app):
    res = runner.invoke(app, ["layers", "--model", "zfnet"])
    assert res.exit_code == 0, res.output
    rows = {line.split("│")[1].strip(): line for line in res.output.splitlines() if "│" in line}
    for name, size, rf in [
        ("features.conv1", "110×110", " 7 "),
        ("features.pool1", "55×55", " 11 "),
        ("features.conv2", "26×26", " 27 "),
        ("features.pool2", "13×13", " 43 "),
        ("features.relu5", "13×13", " 139 "),
        ("features.pool5", "6×6", " 171 "),
    ]:
        assert size in rows[name] and rf in rows[name], rows[name]


@pytest.mark.parametrize("model", ["resnet18", "efficientnet_lite0"])
def test_layers_timm_models(app, model):
    res = runner.invoke(app, ["layers", "--model", model, "--size", "64"])
    assert res.exit_code == 0, res.output
    assert "global" in res.output and "Conv2d" in res.output


def test_probe_options_come_from_the_plugin(app, images, tmp_path):
    res = runner.invoke(app, ["probe", "echo", "--help"])
    assert res.exit_code == 0 and "--repeat" in res.output and "--mode" in res.output
    res = runner.invoke(
        app,
        [
            "probe",
            "echo",
            "--model",
            "zfnet",
            "--images",
            str(images),
            "--out",
            str(tmp_path / "o"),
            "--repeat",
            "3",
            "--mode",
            "max",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "repeat" in res.output and (tmp_path / "o" / "echo" / "run.json").exists()
    assert (tmp_path / "o" / "index.html").exists()


def test_bad_inputs_exit_2_with_one_line(app, images, tmp_path):
    base = ["probe", "echo", "--model", "zfnet", "--out", str(tmp_path / "o")]
    res = runner.invoke(app, [*base, "--images", str(images), "--layer", "features.conv9"])
    assert res.exit_code == 2 and "features.conv9" in _one_error_line(res)
    res = runner.invoke(app, [*base, "--images", str(tmp_path / "missing.jpg")])
    assert res.exit_code == 2 and "missing.jpg" in _one_error_line(res)
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image")
    res = runner.invoke(app, [*base, "--images", str(text)])
    assert res.exit_code == 2 and "notes.jpg" in _one_error_line(res)
    res = runner.invoke(app, [*base, "--images", str(images), "--mode", "median"])
    assert res.exit_code == 2 and "median" in _one_error_line(res)
    res = runner.invoke(app, ["layers", "--model", "zfnt"])
    assert res.exit_code == 2 and "zfnet" in _one_error_line(res)
    res = runner.invoke(app, ["layers", "--model", "zfnet", "--weights", str(tmp_path / "w.pt")])
    assert res.exit_code == 2 and "w.pt" in _one_error_line(res)


def test_debug_shows_the_traceback(app, tmp_path):
    res = runner.invoke(app, ["--debug", "layers", "--model", "zfnt"])
    assert res.exit_code != 0 and res.exception is not None


def test_cuda_request_without_gpu_is_clear(app, images, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    res = runner.invoke(
        app,
        [
            "probe",
            "echo",
            "--model",
            "zfnet",
            "--images",
            str(images),
            "--device",
            "cuda",
            "--out",
            str(tmp_path),
        ],
    )
    assert res.exit_code == 2 and "CUDA" in _one_error_line(res)


def test_unknown_recipe_and_probe_exit_2(app):
    assert runner.invoke(app, ["probe", "nope"]).exit_code == 2
    assert runner.invoke(app, ["recipe", "nope"]).exit_code == 2


def test_demo_runs_every_probe_into_one_report(app, images, tmp_path, monkeypatch):
    import importlib

    demo = importlib.import_module("convlens.cli.demo")  # the module, not the command function
    monkeypatch.setattr(demo, "DEMO_UNITS", 2)  # the atlas's wiring, not its 32 units' drawing
    out = tmp_path / "demo"
    res = runner.invoke(
        app, ["demo", "--model", "zfnet", "--images", str(images), "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert (out / "echo" / "run.json").exists() and (out / "overview" / "overview.json").exists()
    html = (out / "index.html").read_text()
    assert "Model overview" in html and "random weights" in html
    # the small atlas (two layers, DEMO_UNITS units each) is linked from the report
    assert "href='atlas/index.html'" in html
    assert len(list((out / "atlas").glob("*/u*.html"))) == 2 * 2
    res = runner.invoke(app, ["demo", "--probes", "nope", "--out", str(out)])
    assert res.exit_code == 2 and "nope" in _one_error_line(res)


def test_overview_streams_at_most_16_images(tmp_path):
    import warnings

    import numpy as np
    from PIL import Image

    from convlens.models import create_model
    from convlens.probe import ProbeContext
    from convlens.runner import write_overview

    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(20):
        Image.fromarray(np.full((40, 40, 3), i * 10, np.uint8)).save(folder / f"{i:02d}.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = create_model("zfnet_mini")
    ctx = ProbeContext(model, "zfnet_mini", [folder], tmp_path / "o", {})
    data = write_overview(ctx, tmp_path / "o")
    assert len(data["predictions"]) == 16
    assert data["predictions"][0]["image"].endswith("00.png") and data["random_weights"]


def test_out_that_is_a_file_or_unwritable_exits_2_before_any_work(
    app, images, tmp_path, monkeypatch
):
    blocker = tmp_path / "report.txt"
    blocker.write_text("keep me")
    base = ["probe", "echo", "--model", "zfnet", "--images", str(images)]
    res = runner.invoke(app, [*base, "--out", str(blocker)])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "report.txt" in lines[0] and "is a file" in lines[0]
    assert blocker.read_text() == "keep me"
    res = runner.invoke(app, [*base, "--out", str(blocker / "sub")])
    assert res.exit_code == 2 and "is a file" in res.output

    import convlens.io

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(convlens.io.tempfile, "mkstemp", denied)
    res = runner.invoke(app, [*base, "--out", str(tmp_path / "ro")])
    assert res.exit_code == 2, res.output
    assert "cannot write there (Permission denied)" in res.output
    assert "Traceback" not in res.output


def test_several_paths_after_one_images_flag(tmp_path, images):
    from convlens.cli import expand_multi
    from tests.conftest import run_cli

    assert expand_multi(["probe", "x", "--images", "a", "b", "-i", "c", "d", "--top", "2"]) == [
        "probe", "x", "--images", "a", "--images", "b", "-i", "c", "-i", "d", "--top", "2",
    ]  # fmt: skip
    a, b, _ = sorted(images.iterdir())
    res = run_cli(["probe", "deconv", "--model", "zfnet_mini", "--images", str(a), str(b),
                   "--layer", "conv1", "--channels", "0", "--top", "1", "--no-poster",
                   "--render-channels", "1", "--out", str(tmp_path / "o")],
                  env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    import json

    run = json.loads((tmp_path / "o" / "deconv" / "run.json").read_text())
    assert run["images"] == [str(a), str(b)]


def test_piped_tables_are_not_truncated_and_a_warning_is_said_once(capsys):
    from convlens.cli import _console
    from convlens.data import default_images
    from tests.conftest import run_cli

    res = run_cli(["samples"])  # stdout is a pipe here, as with `convlens samples | cat`
    assert res.returncode == 0, res.stderr
    for p in default_images():
        assert str(p) in res.stdout  # whole paths, no ellipsis
    assert "…" not in res.stdout
    _console._shown.discard("x.png: skipped: not an image")
    for _ in range(2):
        _console.show_warning("x.png: skipped: not an image", UserWarning, "f", 1)
    assert capsys.readouterr().err.count("x.png: skipped") == 1


def test_layers_defaults_to_the_probes_default_model(app):
    from convlens.runner import DEFAULT_MODEL

    res = runner.invoke(app, ["layers"])
    assert res.exit_code == 0, res.output
    assert DEFAULT_MODEL == "efficientnet_lite0" and "bn2.act" in res.output
