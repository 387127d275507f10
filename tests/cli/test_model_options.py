"""The models people have: a fine-tuned head (--num-classes), factory arguments (--model-arg),
EMA weights (--weights-key), their own preprocessing (--mean/--std/--input-size), a bare
nn.Module (a warning naming the assumption)."""

from __future__ import annotations

import argparse
import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import convlens
from convlens.cli import build_app
from convlens.errors import ConvlensError
from convlens.options import parse_model_args
from convlens.runner import PreprocessAssumedWarning, load_model
from convlens.testing import tiny_model, tiny_probe_model

runner = CliRunner()


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    import timm

    d = tmp_path_factory.mktemp("ft")
    torch.manual_seed(0)
    m = timm.create_model("resnet18", num_classes=10)
    save_file(m.state_dict(), str(d / "r18_10cls.safetensors"))
    torch.save({"epoch": 7, "state_dict": m.state_dict(),
                "state_dict_ema": {k: v.clone() for k, v in m.state_dict().items()},
                "args": argparse.Namespace(model="resnet18", num_classes=10),
                "metric": np.float64(81.2)}, d / "checkpoint-7.pth.tar")  # fmt: skip
    return d, m


def test_a_fine_tuned_resnet18_loads_with_num_classes_and_says_so_without(finetuned):
    d, ref = finetuned
    res = runner.invoke(build_app(), ["layers", "--model", "resnet18", "--weights",
                                      str(d / "r18_10cls.safetensors")])  # fmt: skip
    assert res.exit_code == 2 and "pass --num-classes 10" in res.output
    res = runner.invoke(build_app(), ["layers", "--model", "resnet18", "--num-classes", "10",
                                      "--weights", str(d / "r18_10cls.safetensors")])  # fmt: skip
    assert res.exit_code == 0, res.output
    res = runner.invoke(build_app(), ["layers", "--model", "resnet18", "--num-classes", "10",
                                      "--weights", str(d / "checkpoint-7.pth.tar")])  # fmt: skip
    assert res.exit_code == 0, res.output  # a timm training checkpoint: args, numpy metric
    net, _ = load_model("resnet18", weights=d / "checkpoint-7.pth.tar", num_classes=10,
                        weights_key="state_dict_ema")  # fmt: skip
    assert torch.equal(net.fc.weight, ref.fc.weight)
    assert net.convlens_info.weights.endswith("[state_dict_ema]")


def test_model_args_are_typed_and_reach_the_factory():
    assert parse_model_args(["depth=3", "rate=0.5", "flag=true", "off=False", "xs=[1, 2]",
                             "name=abc"]) == {
        "depth": 3, "rate": 0.5, "flag": True, "off": False, "xs": [1, 2], "name": "abc",
    }  # fmt: skip
    for bad in (["novalue"], ["a=1", "a=2"], ["1x=3"]):
        with pytest.raises(ConvlensError, match="--model-arg"):
            parse_model_args(bad)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net, _ = load_model("resnet18", model_args={"drop_rate": 0.25}, num_classes=4)
    assert net.drop_rate == 0.25 and net.fc.out_features == 4


def test_mean_std_input_size_change_what_run_json_records_and_what_the_model_sees(tmp_path, images):
    res = convlens.run_probe(
        "occlusion", tiny_probe_model("resnet"), images=[images], out=tmp_path, device="cpu",
        window=16, stride=16, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], input_size=48,
    )  # fmt: skip
    run = json.loads((tmp_path / "occlusion" / "run.json").read_text())
    pp = run["preprocess"]
    assert pp["input_size"] == [48, 48] and pp["mean"] == [0.5] * 3 and pp["std"] == [0.25] * 3
    z = np.load(tmp_path / "occlusion" / "occlusion.npz")
    assert z["inputs"].shape[-2:] == (48, 48)
    assert res.files
    with pytest.raises(ConvlensError, match="--input-size"):
        load_model(tiny_probe_model(), input_size=[3, 4, 5, 6])
    with pytest.raises(ConvlensError, match="--std"):
        load_model(tiny_probe_model(), std=[0.2, 0.0, 0.2])


def test_a_bare_module_gets_a_warning_naming_the_assumption():
    bare, _ = tiny_model("chain")
    with pytest.warns(PreprocessAssumedWarning, match="ImageNet mean/std at 224 px"):
        load_model(bare)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PreprocessAssumedWarning)
        net, _ = load_model(tiny_model("chain")[0], input_size=32)  # told: no warning
    assert net.convlens_info.input_size == (3, 32, 32)
