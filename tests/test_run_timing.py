"""run.json's ``timing``: the time before the probe (the command's start-up) read from the OS's
process start, and the probe's own seconds — checked against wall clocks taken outside."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

import convlens
from convlens.runner import process_age
from convlens.testing import tiny_probe_model

_CHILD = """
import time
time.sleep({sleep})
from convlens.runner import process_age
print(repr(process_age()))
"""


def test_process_age_counts_from_the_process_start_measured_by_its_parent():
    """A child that sleeps 0.6 s before it even imports convlens reports at least that, and no
    more than its parent's wall clock from launch to exit."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _CHILD.format(sleep=0.6)], check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    wall = time.perf_counter() - t0
    age, since = eval(out.strip())  # noqa: S307 - our own child's repr of a (float, str)
    if since != "process start":
        pytest.skip("no /proc: process_age counts from the import")
    assert 0.6 - 0.02 <= age <= wall + 0.02  # /proc's clock ticks: 10 ms steps


def test_run_json_records_the_time_before_the_probe_and_the_probes_own(tmp_path, images):
    torch.set_num_threads(1)
    before, _ = process_age()
    t0 = time.perf_counter()
    convlens.run_probe("occlusion", tiny_probe_model("chain"), images=[images], out=tmp_path / "out",
                       device="cpu", window=16, stride=16)  # fmt: skip
    wall = time.perf_counter() - t0
    after, _ = process_age()
    timing = json.loads((tmp_path / "out" / "occlusion" / "run.json").read_text())["timing"]
    assert before - 0.02 <= timing["model_ready_s"] <= after + 0.02
    assert 0 < timing["probe_s"] <= wall
    assert timing["model_ready_s"] + timing["probe_s"] <= after + 0.02  # one after the other
    assert timing["model_ready_since"] in ("process start", "convlens.runner import")
