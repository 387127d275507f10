"""Every numeric option of every registered probe and recipe: zero or a negative value where it
makes no sense is a one-line error naming the flag, exit 2 — never silently the default."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from convlens.cli import build_app
from convlens.errors import ConvlensError
from convlens.options import Option, parse_options
from convlens.plugins import get_host

runner = CliRunner()


def _numeric():
    host = get_host()
    rows = []
    for kind, reg in (("probe", host.probes), ("recipe", host.recipes)):
        for name, cls in reg.items():
            for o in cls.options:
                if o.type in (int, float):
                    rows.append((kind, name, o))
    return rows


NUMERIC = _numeric()


def test_every_numeric_option_declares_its_bounds():
    missing = [f"{k} {n} {o.flag}" for k, n, o in NUMERIC if o.min is None and o.max is None]
    assert not missing, missing


@pytest.mark.parametrize("kind,name,opt", NUMERIC, ids=[f"{n}{o.flag}" for _, n, o in NUMERIC])
def test_below_the_minimum_is_an_error_naming_the_flag(kind, name, opt):
    bad = opt.min - 1
    with pytest.raises(ConvlensError, match=rf"option {opt.flag}: .* below its minimum"):
        parse_options([opt], {opt.name: bad})
    ok = parse_options([opt], {opt.name: opt.min})
    assert ok[opt.name] == opt.min  # the bound itself is kept as given, not replaced


@pytest.mark.parametrize(
    "args,flag",
    [
        (["probe", "occlusion", "--stride", "0"], "--stride"),
        (["probe", "occlusion", "--window", "0"], "--window"),
        (["probe", "occlusion", "--stride", "-8"], "--stride"),
        (["probe", "deconv", "--top", "0"], "--top"),
        (["probe", "occlusion", "--full-above", "1.5"], "--full-above"),
        (["probe", "linear", "--folds", "0"], "--folds"),
    ],
)
def test_cli_zero_and_negative_values_exit_2_in_one_line(args, flag, tmp_path):
    res = runner.invoke(build_app(), [*args, "--out", str(tmp_path / "o")])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and flag in lines[0] and "Traceback" not in res.output
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("*.json"))


def test_an_option_with_bounds_checks_floats_and_lists():
    o = Option("fill", float, 0.5, "x", min=0, max=1)
    with pytest.raises(ConvlensError, match="above its maximum 1"):
        parse_options([o], {"fill": 1.5})
    m = Option("k", int, None, "x", multiple=True, min=1)
    with pytest.raises(ConvlensError, match="--k: 0 is below"):
        parse_options([m], {"k": [3, 0]})
