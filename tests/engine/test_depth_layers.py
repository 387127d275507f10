"""depth_layers: about five layers spread by receptive-field size; unsaturated: ReLU6 outputs
stand for their pre-activation."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from convlens.engine import depth_layers, trace_model, unsaturated


def quiet(name: str, **kwargs) -> nn.Module:
    from convlens.models import create_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_model(name, **kwargs).eval()


def test_zfnet_gets_the_papers_layers_one_to_five():
    model = quiet("zfnet", width_mult=0.25)
    got = depth_layers(model)
    assert [n for n, _ in got] == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    shares = [s for _, s in got]
    assert shares == sorted(shares) and shares[0] < 0.05


def test_efficientnet_lite0_spans_a_few_percent_to_the_whole_input_without_relu6_outputs():
    model = quiet("efficientnet_lite0")
    rec = trace_model(model, torch.zeros(1, 3, 224, 224))
    got = depth_layers(model, rec=rec)
    names, shares = [n for n, _ in got], [s for _, s in got]
    assert 4 <= len(got) <= 5
    assert shares == sorted(shares) and len(set(shares)) == len(shares)
    assert shares[0] < 0.05 and shares[-1] == 1.0
    for n in names:  # no layer ends in a ReLU6 (hardtanh): its ceiling ties the top activations
        call = rec.layer(n)
        assert "relu6" not in call.type.lower() and "hardtanh" not in call.type.lower()
    assert names[-1] == "bn2/batch_norm"


def test_unsaturated_maps_a_relu6_output_to_its_input_and_leaves_others():
    model = quiet("efficientnet_lite0")
    rec = trace_model(model, torch.zeros(1, 3, 64, 64))
    assert unsaturated(rec, "bn2.act") == "bn2/batch_norm"
    assert unsaturated(rec, "bn2") == "bn2/batch_norm"  # the container ends in the ReLU6
    assert unsaturated(rec, "blocks.2") == "blocks.2"
    relu = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    rec = trace_model(relu, torch.zeros(1, 3, 8, 8))
    assert unsaturated(rec, "1") == "1"
