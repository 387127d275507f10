"""Any timm architecture by name, never downloading."""

from __future__ import annotations

import warnings

import pytest
import torch

from convlens.errors import ModelNotFoundError, WeightsError
from convlens.models import ModelConfigError, RandomWeightsWarning, create_model


@pytest.fixture
def no_download(monkeypatch):
    """Fail the test if timm's pretrained loader is ever reached."""
    import timm.models._builder as builder

    def refuse(*args, **kwargs):
        raise AssertionError("timm tried to load pretrained weights")

    monkeypatch.setattr(builder, "load_pretrained", refuse)


def test_timm_model_by_name_has_random_weights_and_warns(no_download):
    with pytest.warns(RandomWeightsWarning, match="model 'resnet18' has RANDOM weights"):
        model = create_model("resnet18", num_classes=5)
    info = model.convlens_info
    assert (info.name, info.family, info.weights, info.random_init) == (
        "resnet18",
        "timm",
        "random",
        True,
    )
    assert model.convlens_aliases == {}
    # timm's recorded preprocessing for resnet18 (what a timm-trained checkpoint expects)
    assert (info.interpolation, info.crop_pct) == ("bicubic", 0.95)
    assert not model.training
    assert not any(getattr(m, "inplace", False) for m in model.modules())  # Captum-safe
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)


def test_timm_pretrained_request_is_a_clear_error(no_download):
    with pytest.raises(WeightsError) as err:
        create_model("resnet18", pretrained=True)
    assert "resnet18" in str(err.value) and "weights=PATH" in str(err.value)
    assert "never downloads" in str(err.value)


def test_timm_options_are_checked(no_download):
    with pytest.raises(ModelConfigError, match="weights=PATH"):
        create_model("resnet18", pretrained_cfg_overlay={"file": "x"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        with pytest.raises(ModelConfigError, match="resnet18"):
            create_model("resnet18", not_an_option=1)


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [
        ("zfnet_wid", "zfnet_wide"),
        ("resnet_18", "resnet18"),
        ("efficientnet_lite0x", "efficientnet_lite0"),
    ],
)
def test_unknown_name_lists_matches_from_both_sources(name, suggestion):
    with pytest.raises(ModelNotFoundError) as err:
        create_model(name)
    hint = str(err.value).split("did you mean:")[1]
    assert suggestion in hint.strip(" ?)").split(", ")
