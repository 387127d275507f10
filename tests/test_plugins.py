"""The plugin system: entry-point discovery, isolation of broken plugins, blocking, docs."""

from __future__ import annotations

import inspect
import re
import types
from pathlib import Path

import pytest

from convlens import hookspecs
from convlens.plugins import PluginHost
from tests.conftest import REPO, make_dist, run_cli

HELLO = REPO / "examples" / "convlens-hello-probe" / "convlens_hello.py"


def test_every_hook_is_prefixed_and_documented():
    doc = (REPO / "docs" / "plugins.md").read_text()
    specs = [
        n
        for n, f in inspect.getmembers(hookspecs, inspect.isfunction)
        if hasattr(f, "convlens_spec")
    ]
    assert specs, "no hookspecs found"
    for name in specs:
        assert name.startswith("convlens_")
        assert f"`{name}" in doc, f"{name} is not documented in docs/plugins.md"
        assert inspect.getdoc(getattr(hookspecs, name))


def test_hello_plugin_discovered_through_entry_point(tmp_path, images):
    site = make_dist(
        tmp_path / "site",
        "convlens-hello-probe",
        {"convlens_hello": HELLO.read_text()},
        {"hello": "convlens_hello"},
    )
    listing = run_cli(["plugins"], pythonpath=site)
    assert listing.returncode == 0, listing.stderr
    row = next(line for line in listing.stdout.splitlines() if "hello" in line)
    assert "convlens-hello-probe" in row and "ok" in row
    out = tmp_path / "out"
    res = run_cli(
        [
            "probe",
            "hello",
            "--model",
            "zfnet",
            "--images",
            str(images),
            "--out",
            str(out),
            "--greeting",
            "hi",
            "--layer",
            "conv2",
        ],
        pythonpath=site,
    )
    assert res.returncode == 0, res.stderr
    assert "RANDOM weights" in res.stderr  # loud warning for random init
    import json

    data = json.loads((out / "hello" / "hello.json").read_text())
    assert data["schema_version"] == 1 and data["layer"] == "conv2"
    assert [Path(r["image"]).name for r in data["images"]] == ["img0.png", "img1.png", "img2.png"]
    assert (out / "index.html").read_text().count("Hello") >= 1
    assert "hi img0.png" in res.stdout


def test_broken_plugin_is_reported_and_others_keep_working(tmp_path):
    site = make_dist(
        tmp_path / "site",
        "convlens-broken",
        {
            "broken_plugin": "raise ImportError('no module named quux')",
            "odd_plugin": "import convlens\n@convlens.hookimpl\ndef convlens_no_such_hook(): pass\n",
        },
        {"broken": "broken_plugin", "odd": "odd_plugin"},
    )
    res = run_cli(["plugins"], pythonpath=site)
    assert res.returncode == 0, res.stderr
    broken = next(line for line in res.stdout.splitlines() if line.strip("│ ").startswith("broken"))
    assert "error" in broken and "quux" in res.stdout
    assert "unknown hook" in res.stdout
    layers = run_cli(["layers", "--model", "zfnet"], pythonpath=site)
    assert layers.returncode == 0 and "features.conv1" in layers.stdout


def test_disable_env_blocks_named_plugin(tmp_path):
    site = make_dist(
        tmp_path / "site",
        "convlens-hello-probe",
        {"convlens_hello": HELLO.read_text()},
        {"hello": "convlens_hello"},
    )
    res = run_cli(["plugins"], pythonpath=site, env={"CONVLENS_DISABLE_PLUGINS": "hello"})
    assert "blocked" in res.stdout
    res = run_cli(
        ["probe", "hello", "--help"], pythonpath=site, env={"CONVLENS_DISABLE_PLUGINS": "hello"}
    )
    assert res.returncode == 2


def test_register_hook_that_raises_is_isolated():
    import convlens

    bad = types.SimpleNamespace()

    @convlens.hookimpl
    def convlens_register_probes(registry):
        raise RuntimeError("boom")

    bad.convlens_register_probes = convlens_register_probes
    good = types.ModuleType("good")
    exec(HELLO.read_text(), good.__dict__)
    host = PluginHost(entry_points=False, extra=[("bad", bad), ("good", good)])
    assert "hello" in host.probes
    assert host.plugins["bad"].error and "boom" in host.plugins["bad"].error
    assert host.plugins["good"].provides == ["probe:hello"]


def test_name_collision_warns():
    import convlens

    def plugin(tag):
        ns = types.SimpleNamespace()

        class P(convlens.Probe):
            name = "same"

        @convlens.hookimpl
        def convlens_register_probes(registry):
            registry.register("same", P)

        ns.convlens_register_probes = convlens_register_probes
        return ns

    with pytest.warns(UserWarning, match="'same'.*overrides"):
        PluginHost(entry_points=False, extra=[("a", plugin("a")), ("b", plugin("b"))])


def test_example_plugin_has_three_line_entry_point():
    text = (REPO / "examples" / "convlens-hello-probe" / "pyproject.toml").read_text()
    block = re.search(r"\[project\.entry-points\.convlens\]\n(.*?)\n\n", text, re.S)
    assert block and block.group(1).strip() == 'hello = "convlens_hello"'


def test_the_docs_show_the_example_plugin_exactly_as_it_is_in_the_repo():
    docs = (REPO / "docs" / "plugins.md").read_text()
    for path in (HELLO, REPO / "examples" / "convlens-hello-probe" / "pyproject.toml"):
        rel = path.relative_to(REPO).as_posix()
        block = re.search(r"```\w+\n# " + re.escape(rel) + r"\n(.*?)```", docs, re.S)
        assert block, rel
        assert block.group(1) == path.read_text(), f"docs/plugins.md is out of date with {rel}"


def test_a_probe_without_render_gets_a_section_from_its_summary(tmp_path, images):
    import types

    import convlens
    from convlens.models import create_model

    class Quiet(convlens.Probe):
        name = "quiet"
        summary = "counts the images"

        def run(self, ctx):
            x, _ = ctx.inputs()
            return convlens.ProbeResult(self.name, {"images": int(x.shape[0])})

    ns = types.SimpleNamespace()

    @convlens.hookimpl
    def convlens_register_probes(registry):
        registry.register("quiet", Quiet)

    ns.convlens_register_probes = convlens_register_probes
    from convlens.plugins import PluginHost

    host = PluginHost(entry_points=False, extra=[("quiet", ns)])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = create_model("zfnet_mini")
    convlens.run_probe("quiet", model, images=[images], out=tmp_path, host=host, overview=False)
    html = (tmp_path / "index.html").read_text()
    assert "counts the images" in html and "<td>images</td><td>3</td>" in html
