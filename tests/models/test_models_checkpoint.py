"""load_weights: safetensors and torch checkpoints, wrappers, prefixes, and refusals."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from convlens.errors import WeightsError
from convlens.models import ZFNet, load_weights, read_state_dict

EXECUTED: list[str] = []


def _record_execution() -> dict:
    EXECUTED.append("code ran")
    return {}


class Payload:
    """An arbitrary object whose unpickling would run code."""

    def __reduce__(self):
        return (_record_execution, ())


def small(seed: int, **cfg) -> ZFNet:
    torch.manual_seed(seed)
    return ZFNet(**{"width_mult": 0.0625, "input_size": 64, "num_classes": 5, **cfg})


def assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture
def source() -> ZFNet:
    return small(0)


def test_safetensors_round_trip(tmp_path, source):
    path = tmp_path / "w.safetensors"
    save_file(source.state_dict(), str(path))
    target = small(1)
    assert load_weights(target, path) == ([], [])
    assert_same(source, target)


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda sd: sd, id="plain"),
        pytest.param(lambda sd: {"model": sd, "epoch": 3, "config": {"lr": 0.01}}, id="model"),
        pytest.param(lambda sd: {"state_dict": sd, "optimizer": {}}, id="state_dict"),
        pytest.param(lambda sd: {"model_state": sd}, id="model_state"),
        pytest.param(lambda sd: {f"module.{k}": v for k, v in sd.items()}, id="ddp"),
        pytest.param(lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()}, id="compiled"),
        pytest.param(
            lambda sd: {"model": {f"module._orig_mod.{k}": v for k, v in sd.items()}},
            id="wrapped-ddp-compiled",
        ),
    ],
)
def test_torch_checkpoint_round_trip(tmp_path, source, wrap):
    path = tmp_path / "ckpt.pt"
    torch.save(wrap(source.state_dict()), path)
    target = small(1)
    load_weights(target, path)
    assert_same(source, target)


def test_pickled_arbitrary_object_is_refused(tmp_path, source):
    path = tmp_path / "evil.pt"
    torch.save({"model": source.state_dict(), "extra": Payload()}, path)
    target = small(1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(WeightsError) as err:
        load_weights(target, path)
    message = str(err.value)
    assert str(path) in message and "needs the Python global" in message
    assert "_record_execution" in message and "safetensors" in message  # names it, says how
    assert "\n" not in message and "\x1b" not in message
    assert EXECUTED == []  # the payload never ran
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_shape_mismatch_names_the_key_and_shapes(tmp_path, source):
    path = tmp_path / "w.safetensors"
    save_file(source.state_dict(), str(path))
    target = small(1, num_classes=7)
    with pytest.raises(WeightsError) as err:
        load_weights(target, path)
    message = str(err.value)
    assert str(path) in message
    assert "classifier.fc8.weight (5, 256) in file vs (7, 256) in model" in message
    with pytest.raises(WeightsError):  # shape mismatches are never tolerated
        load_weights(target, path, strict=False)


def test_missing_and_unexpected_keys(tmp_path, source):
    state = source.state_dict()
    state.pop("features.conv1.weight")
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "partial.pt"
    torch.save(state, path)
    target = small(1)
    with pytest.raises(WeightsError) as err:
        load_weights(target, path)
    assert "missing key(s): features.conv1.weight" in str(err.value)
    assert "unexpected key(s): extra.weight" in str(err.value)
    conv1 = target.features.conv1.weight.clone()
    missing, unexpected = load_weights(target, path, strict=False)
    assert (missing, unexpected) == (["features.conv1.weight"], ["extra.weight"])
    assert torch.equal(target.features.conv1.weight, conv1)
    assert torch.equal(target.features.conv2.weight, source.features.conv2.weight)


def test_many_missing_keys_are_summarised(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({f"layer{i}.weight": torch.zeros(1) for i in range(10)}, path)
    with pytest.raises(
        WeightsError,
        match=r"10 unexpected key\(s\): layer0.weight, layer1.weight, "
        r"layer2.weight, … \(7 more\)",
    ):
        load_weights(small(0), path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_weights(small(0), tmp_path / "nope.safetensors")
    with pytest.raises(WeightsError, match="directory"):
        load_weights(small(0), tmp_path)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors", ".bin"])
def test_corrupt_files(tmp_path, suffix):
    path = tmp_path / f"junk{suffix}"
    path.write_bytes(b"\x00not a weights file at all" * 10)
    with pytest.raises(WeightsError) as err:
        load_weights(small(0), path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(WeightsError, match="no state dict"):
        read_state_dict(path)
    path = tmp_path / "mixed.pt"
    torch.save({"a.weight": torch.zeros(2), "step": 3}, path)
    with pytest.raises(WeightsError, match="non-tensor entries: step"):
        read_state_dict(path)


def test_a_timm_style_training_checkpoint_with_args_and_numpy_scalars_loads(tmp_path, source):
    import argparse

    import numpy as np

    path = tmp_path / "checkpoint-3.pth.tar"
    torch.save(
        {
            "epoch": 3,
            "arch": "zfnet",
            "state_dict": source.state_dict(),
            "state_dict_ema": {k: v + 1 for k, v in source.state_dict().items()},
            "args": argparse.Namespace(lr=0.1, model="zfnet"),
            "metric": np.float64(71.5),
        },
        path,
    )
    target = small(1)
    load_weights(target, path)
    assert torch.equal(target.features.conv1.weight, source.features.conv1.weight)
    load_weights(target, path, key="state_dict_ema")  # --weights-key state_dict_ema
    assert torch.equal(target.features.conv1.weight, source.features.conv1.weight + 1)
    with pytest.raises(WeightsError, match="no state dict under 'model_ema'.*state_dict_ema"):
        load_weights(target, path, key="model_ema")


def test_a_truncated_checkpoint_says_it_is_corrupt_or_truncated(tmp_path, source):
    path = tmp_path / "w.pth"
    torch.save(source.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="corrupt or truncated") as err:
        load_weights(small(1), path)
    assert "\n" not in str(err.value)


def test_a_classifier_that_alone_differs_suggests_num_classes(tmp_path, source):
    path = tmp_path / "w.pt"
    torch.save(source.state_dict(), path)  # 5 classes
    with pytest.raises(WeightsError, match=r"only the classifier .* pass --num-classes 5"):
        load_weights(small(1, num_classes=7), path)
