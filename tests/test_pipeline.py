"""End to end through the real pieces: bundled photo → preprocessing → offline weights."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

from convlens.data import Preprocess, load_batch, sample
from convlens.models import create_model


def test_pretrained_default_classifies_coffee_as_espresso():
    model = create_model("efficientnet_lite0")
    pre = Preprocess.for_model(model)
    x, _ = load_batch([sample("coffee").path, sample("chelsea").path], pre)
    with torch.inference_mode():
        probs = model(x).softmax(-1)
    assert int(probs[0].argmax()) == 967  # espresso
    assert 281 <= int(probs[1].argmax()) <= 285  # a domestic cat
    assert model.convlens_info.class_names[967].lower().startswith("espresso")


def test_samples_command_lists_bundled_photos():
    from convlens.cli import build_app

    res = CliRunner().invoke(build_app(), ["samples"])
    assert res.exit_code == 0
    assert "coffee" in res.output and "china" in res.output
