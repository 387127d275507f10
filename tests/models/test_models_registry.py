"""create_model / list_models / register_model, parametrised over the registry itself."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import nn

from convlens.errors import ConvlensError, ModelNotFoundError, WeightsError
from convlens.models import (
    MODELS,
    ModelConfigError,
    ModelInfo,
    RandomWeightsWarning,
    create_model,
    is_model,
    list_models,
    register_model,
)

pytestmark = pytest.mark.filterwarnings("ignore::convlens.models.RandomWeightsWarning")

FAMILIES = {
    "zfnet": "zfnet",
    "zfnet_wide": "zfnet",
    "zfnet_mini": "zfnet",
    "alexnet": "alexnet",
    "efficientnet_lite0": "timm",
    "efficientnet_lite1": "timm",
    "efficientnet_lite2": "timm",
}
SIZES = {"efficientnet_lite1": 240, "efficientnet_lite2": 260}


@pytest.fixture
def restore_registry():
    """Registering in a test must not leak into the next one."""
    items, sources = dict(MODELS._items), dict(MODELS._sources)
    yield
    MODELS._items.clear()
    MODELS._items.update(items)
    MODELS._sources.clear()
    MODELS._sources.update(sources)


def test_builtin_models_are_registered():
    assert list_models() == list(FAMILIES)


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_builds_and_runs(name):
    model = create_model(name)
    info = model.convlens_info
    assert isinstance(info, ModelInfo)
    assert (info.name, info.family, info.num_classes) == (name, FAMILIES[name], 1000)
    size = SIZES.get(name, 224)
    assert info.input_size == (3, size, size)
    assert info.random_init == (info.weights == "random")
    assert not model.training
    modules = dict(model.named_modules())
    assert isinstance(model.convlens_aliases, dict)
    for alias, target in model.convlens_aliases.items():
        assert target in modules, f"{name}: alias {alias} → {target}"
    with torch.no_grad():
        assert model(torch.randn(1, *info.input_size)).shape == (1, 1000)


@pytest.mark.parametrize("name", list_models())
def test_num_classes_reaches_the_classifier(name):
    model = create_model(name, num_classes=7, pretrained=False)
    assert model.convlens_info.num_classes == 7
    assert model.convlens_info.class_names is None
    with torch.no_grad():
        assert model(torch.randn(2, 3, 224, 224)).shape == (2, 7)


def test_random_weights_warn_every_time_naming_the_model():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # once per location: must not hide the repeat
        for _ in range(2):
            create_model("zfnet_mini")
    random_warnings = [w for w in caught if issubclass(w.category, RandomWeightsWarning)]
    assert len(random_warnings) == 2
    message = str(random_warnings[0].message)
    assert "model 'zfnet_mini' has RANDOM weights" in message and "weights=PATH" in message
    assert random_warnings[0].filename == __file__  # points at the caller, not at convlens


def test_random_weights_warning_respects_filters():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("ignore", RandomWeightsWarning)
        create_model("zfnet_mini")
    assert not caught
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomWeightsWarning)
        with pytest.raises(RandomWeightsWarning):
            create_model("zfnet_mini")


def test_random_model_info():
    info = create_model("zfnet_mini").convlens_info
    assert info.weights == "random" and info.random_init
    assert info.class_names is None
    assert (info.mean, info.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert (info.interpolation, info.crop_pct, info.resize_size) == ("bilinear", 0.875, 256)
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.name = "other"


@pytest.mark.parametrize(
    ("name", "suggestion"), [("zfnt", "zfnet"), ("alexnt", "alexnet"), ("resnet1", "resnet18")]
)
def test_unknown_name_suggests_close_matches(name, suggestion):
    with pytest.raises(ModelNotFoundError) as err:
        create_model(name)
    assert f"unknown model {name!r}" in str(err.value)
    assert suggestion in str(err.value).split("did you mean:")[1]
    assert isinstance(err.value, ConvlensError)


@pytest.mark.parametrize("bad", ["", "   ", None])
def test_empty_name(bad):
    with pytest.raises(ModelNotFoundError):
        create_model(bad)


def test_hyphenated_name_resolves_to_registered_one():
    model = create_model("zfnet-wide", width_mult=0.125)
    assert model.convlens_info.name == "zfnet_wide"
    assert model.features.conv4.out_channels == 128  # 1024 · 0.125


def test_unknown_option_is_an_error_not_ignored():
    with pytest.raises(ModelConfigError, match="fc_sizes"):
        create_model("zfnet", fc_size=(2048, 2048))


def test_config_options_pass_through():
    model = create_model("zfnet_mini", conv34=False, fc_sizes=(), lrn=False)
    assert "features.conv3" not in dict(model.named_modules())
    assert set(model.convlens_aliases) == {"conv1", "conv2", "conv5", "pool5", "fc8", "logits"}


def test_pretrained_true_without_offline_weights_is_an_error():
    with pytest.raises(WeightsError, match="weights=PATH"):
        create_model("zfnet", pretrained=True)


def test_weights_path_and_pretrained_true_conflict(tmp_path):
    with pytest.raises(WeightsError, match="either"):
        create_model("zfnet_mini", weights=tmp_path / "w.pt", pretrained=True)


def test_weights_path_loads_and_is_recorded(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = create_model("zfnet_mini")
    path = tmp_path / "mini.safetensors"
    save_file(source.state_dict(), str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomWeightsWarning)  # trained weights: no warning
        model = create_model("zfnet_mini", weights=path)
    info = model.convlens_info
    assert info.weights == str(path) and not info.random_init
    assert info.class_names is not None and len(info.class_names) == 1000
    for (k, a), b in zip(source.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_list_models_pattern_and_timm():
    assert list_models(pattern="zfnet*") == ["zfnet", "zfnet_wide", "zfnet_mini"]
    everything = list_models(include_timm=True)
    assert everything[: len(FAMILIES)] == list(FAMILIES)
    assert "resnet18" in everything
    assert len(everything) == len(set(everything))  # efficientnet_lite0 listed once
    assert list_models(include_timm=True, pattern="resnet1?") == sorted(
        list_models(include_timm=True, pattern="resnet1?")
    )
    assert is_model("zfnet") and is_model("resnet18") and not is_model("zfnt")


def test_register_model_bare_and_with_options(restore_registry):
    @register_model
    def tiny_test_net(num_classes: int = 3) -> nn.Module:
        net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, num_classes))
        net.convlens_aliases = {"logits": "1"}
        return net

    @register_model(name="tiny-named", family="toy")
    def _factory(num_classes: int = 2) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, num_classes))

    assert "tiny_test_net" in list_models() and "tiny-named" in list_models()
    model = create_model("tiny_test_net", num_classes=4)
    assert model(torch.zeros(1, 3, 8, 8)).shape == (1, 4)
    assert model.convlens_info.family == "custom" and model.convlens_info.num_classes == 4
    assert model.convlens_aliases == {"logits": "1"}
    other = create_model("tiny-named")
    assert other.convlens_info.family == "toy" and other.convlens_aliases == {}


def test_registering_an_existing_name_warns(restore_registry):
    with pytest.warns(UserWarning, match="'zfnet'.*overrides"):

        @register_model(name="zfnet")
        def _other(**kwargs) -> nn.Module:
            return nn.Identity()

    assert isinstance(create_model("zfnet"), nn.Identity)
