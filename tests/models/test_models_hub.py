"""Pretrained timm weights the way timm loads them (tags, --pretrained, hf-hub:/timm/ names), from
a Hugging Face cache the test fills itself, with the hub's offline switch set; an empty cache is
one line naming the folder searched."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import run_cli

TAG = "mobilenetv3_small_050.lamb_in1k"
REPO = "timm/mobilenetv3_small_050.lamb_in1k"
REV = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> Path:
    """A Hugging Face cache holding seeded weights for REPO, laid out as the hub lays it out."""
    import timm

    home = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", pretrained=False)
    with torch.no_grad():  # not timm's init: the test can tell the weights came from the file
        for p in model.parameters():
            p.add_(0.01)
    repo_dir = home / "hub" / ("models--" + REPO.replace("/", "--"))
    snap = repo_dir / "snapshots" / REV
    snap.mkdir(parents=True)
    save_file(model.state_dict(), str(snap / "model.safetensors"))
    cfg = {"architecture": "mobilenetv3_small_050", "num_classes": 1000,
           "pretrained_cfg": {"input_size": [3, 192, 192], "mean": [0.5, 0.5, 0.5],
                              "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
                              "crop_pct": 0.9, "num_classes": 1000, "classifier": "classifier"}}  # fmt: skip
    (snap / "config.json").write_text(json.dumps(cfg))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(REV)
    return home


def env(home: Path) -> dict[str, str]:
    return {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_a_pretrained_tag_loads_from_the_cache_and_run_json_records_its_origin(
    hf_home, tmp_path, images
):
    img = sorted(images.iterdir())[0]
    res = run_cli(["probe", "occlusion", "--model", TAG, "--images", str(img), "--window",
                   "112", "--stride", "112", "--out", str(tmp_path)], env=env(hf_home))  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert "RANDOM" not in res.stderr
    run = json.loads((tmp_path / "occlusion" / "run.json").read_text())
    assert run["weights"].startswith(f"pretrained:hf-hub:{REPO}@sha256:")
    assert run["weights_sha256"] and run["weights"].endswith(run["weights_sha256"])
    assert run["preprocess"]["interpolation"] == "bicubic"  # timm's config for the tag


def test_the_loaded_weights_are_the_cached_file_and_hf_hub_names_bring_their_config(
    hf_home, monkeypatch
):
    from huggingface_hub import constants

    from convlens.models import create_model

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    file = load_file(str(next((hf_home / "hub").rglob("model.safetensors"))))
    for name, kw in ((TAG, {}), ("mobilenetv3_small_050", {"pretrained": True})):
        m = create_model(name, **kw)
        sd = m.state_dict()
        assert all(torch.equal(sd[k], v) for k, v in file.items() if k in sd)
        assert not m.convlens_info.random_init and m.convlens_info.class_names is not None
    hub = create_model(f"hf-hub:{REPO}")
    assert hub.convlens_info.input_size == (3, 192, 192)  # from the repo's config.json
    assert hub.convlens_info.mean == (0.5, 0.5, 0.5)
    assert np.isclose(hub.convlens_info.crop_pct, 0.9)
    assert create_model(f"timm/{TAG}").convlens_info.weights.startswith("pretrained:hf-hub:")


def test_an_empty_cache_is_one_line_naming_the_folder_and_how_to_fetch(tmp_path):
    res = run_cli(["layers", "--model", TAG], env=env(tmp_path / "empty"))
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1
    assert str(tmp_path / "empty" / "hub") in lines[0] and REPO in lines[0]
    assert "timm.create_model" in lines[0] and "never downloads" in lines[0]


def test_torchvision_pretrained_from_the_torch_hub_cache_with_its_preprocessing(tmp_path):
    import torchvision
    from torchvision.models import get_model_weights

    from convlens.errors import WeightsError
    from convlens.models import create_model
    from convlens.models.torchvision_adapter import checkpoint_path

    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        with pytest.raises(WeightsError, match=r"not in the torch hub cache .*hub/checkpoints"):
            create_model("torchvision:squeezenet1_1")
        w = get_model_weights("squeezenet1_1").DEFAULT
        torch.manual_seed(0)
        ref = torchvision.models.squeezenet1_1()
        path = checkpoint_path(w.url)
        path.parent.mkdir(parents=True)
        torch.save(ref.state_dict(), path)
        m = create_model("torchvision:squeezenet1_1")
    finally:
        torch.hub.set_dir(old)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(),
                                                  ref.state_dict().values(), strict=True))  # fmt: skip
    info = m.convlens_info
    t = w.transforms()
    assert info.input_size == (3, t.crop_size[0], t.crop_size[0])
    assert info.mean == tuple(t.mean) and info.class_names[0] == w.meta["categories"][0]
    assert info.weights.startswith("pretrained:torchvision:SqueezeNet1_1_Weights")
