"""Feature extraction of the ``linear`` probe: the vectors equal a plain forward-hook computation,
the on-disk cache is keyed correctly, read back instead of recomputed (>= 5x faster), resumed
after an interruption, and shared by two ``torch.distributed`` (gloo) ranks."""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from convlens_linear import (
    ShardedFeatures,
    candidate_layers,
    default_layers,
    extract_features,
    pool_features,
    scan_image_folder,
)
from PIL import Image
from torch import nn

from convlens.data import SkippedImageWarning
from convlens.errors import ConvlensError
from convlens.models import ModelInfo
from convlens.testing import tiny_model

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def tiny() -> nn.Module:
    """The seeded tiny chain net with 32x32 preprocessing (no resize beyond 32, no crop)."""
    model, _ = tiny_model("chain")
    model.convlens_info = ModelInfo(
        "tiny-chain", "test", "seed0", False, 5, (3, 32, 32), MEAN, STD, "bilinear", 1.0
    )
    return model


def make_folder(root: Path, classes: int = 3, per_class: int = 8, size: int = 40) -> Path:
    """An ImageFolder tree of oriented, noisy stripes (one orientation per class)."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for c in range(classes):
        d = root / f"class{c}"
        d.mkdir(parents=True)
        angle = np.pi * c / classes
        for i in range(per_class):
            phase = rng.uniform(0, 2 * np.pi)
            wave = np.sin(12 * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
            rgb = np.stack([wave, wave * rng.uniform(-1, 1), -wave], -1) * 90 + 128
            rgb += rng.normal(0, 30, rgb.shape)
            Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(d / f"{i:02d}.png")
    return root


def plain_features(model: nn.Module, paths, modules: list[str]) -> dict[str, np.ndarray]:
    """Reference: torchvision transforms + forward hooks, nothing from convlens."""
    from torchvision import transforms

    tf = transforms.Compose(
        [
            transforms.Resize(32),
            transforms.CenterCrop(32),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])
    got: dict[str, torch.Tensor] = {}
    named = dict(model.named_modules())
    hooks = [
        named[m].register_forward_hook(lambda mod, i, o, m=m: got.__setitem__(m, o.clone()))
        for m in modules
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return {m: got[m].flatten(1).numpy() for m in modules}


def test_features_equal_plain_forward_hooks(tmp_path):
    ds = scan_image_folder(make_folder(tmp_path / "data"))
    model = tiny()
    feats = extract_features(
        model, ds, ["conv2", "conv3"], cache_dir=tmp_path / "cache", batch_size=5, shard_size=7
    )
    ref = plain_features(model, ds.paths, ["features.relu2", "features.relu3"])
    assert feats.n_shards == 4 and feats.computed_shards == [0, 1, 2, 3]
    for layer, module in (("conv2", "features.relu2"), ("conv3", "features.relu3")):
        lf = feats.layers[layer]
        assert lf.pool == "none" and lf.dim == ref[module].shape[1]
        np.testing.assert_allclose(np.asarray(feats[layer]), ref[module], rtol=1e-5, atol=1e-5)
    assert ds.classes == ("class0", "class1", "class2")
    assert feats.valid.all() and feats.skipped == []


def test_pooling_modes_match_torch_reference():
    a = torch.randn(2, 10, 13, 11)
    v, how = pool_features(a, "none")
    assert how == {"pool": "none", "grid": None, "dim": 1430} and torch.equal(v, a.flatten(1))
    # auto grid: the largest g with C g^2 <= max_dim (10 * 3^2 = 90 <= 100 < 10 * 4^2)
    v, how = pool_features(a, "avg", grid=0, max_dim=100)
    assert how["grid"] == [3, 3] and torch.allclose(v, F.adaptive_avg_pool2d(a, 3).flatten(1))
    v, how = pool_features(a, "max", grid=1)
    assert torch.allclose(v, a.amax((2, 3)))
    v, how = pool_features(a, "auto", max_dim=2000)  # small enough: kept whole
    assert how["pool"] == "none"
    v, how = pool_features(a, "auto", max_dim=1000)
    assert how["pool"] == "avg" and how["dim"] <= 1000
    v, how = pool_features(a, "avg", grid=20)  # capped at the map size
    assert how["grid"] == [13, 11]
    v, how = pool_features(torch.randn(3, 7), "max")
    assert how["pool"] == "none" and v.shape == (3, 7)
    with pytest.raises(ConvlensError):
        pool_features(a, "median")


def test_second_run_reads_the_cache_and_is_5x_faster(tmp_path):
    """A deliberately slow model (50 ms per forward pass): the second extraction runs no
    forward pass at all."""
    ds = scan_image_folder(make_folder(tmp_path / "data", per_class=6))
    model = tiny()
    calls = []

    def slow(mod, args):
        calls.append(1)
        time.sleep(0.05)

    handle = model.register_forward_pre_hook(slow)
    try:
        t = time.perf_counter()
        first = extract_features(model, ds, ["conv3"], cache_dir=tmp_path / "c", batch_size=2)
        t_first = time.perf_counter() - t
        n_calls = len(calls)
        t = time.perf_counter()
        second = extract_features(model, ds, ["conv3"], cache_dir=tmp_path / "c", batch_size=2)
        t_second = time.perf_counter() - t
    finally:
        handle.remove()
    assert n_calls == 9 and len(calls) == n_calls  # no forward pass the second time
    assert second.from_cache and second.layers["conv3"].from_cache and second.computed_shards == []
    assert t_first >= 5 * t_second, (t_first, t_second)
    np.testing.assert_array_equal(np.asarray(first["conv3"]), np.asarray(second["conv3"]))
    assert isinstance(second["conv3"].shards[0], np.memmap)


def test_cache_key_changes_with_weights_preprocessing_pooling_and_files(tmp_path):
    root = make_folder(tmp_path / "data", per_class=3)
    cache = tmp_path / "cache"
    model = tiny()

    def run(m=model, **kw):
        return extract_features(m, scan_image_folder(root), ["conv2"], cache_dir=cache, **kw)

    base = run()
    assert not base.from_cache and run().from_cache
    other = tiny()
    with torch.no_grad():
        other.features.conv1.bias.add_(0.5)
    assert not run(other).from_cache  # same architecture and name, other weights
    assert not run(pool="max", grid=2).from_cache
    from convlens.data import Preprocess

    assert not run(preprocess=Preprocess((32, 32), 40, MEAN, STD)).from_cache
    # a changed file (size/mtime) changes the dataset fingerprint
    img = next(root.glob("class0/*.png"))
    Image.new("RGB", (40, 40), (10, 200, 30)).save(img)
    os.utime(img, ns=(1, 1))
    assert not run().from_cache
    folders = {p.parent.name for p in cache.glob("*/*/meta.json")}
    assert len(folders) == 5
    meta = json.loads(next(cache.glob("*/*/meta.json")).read_text())
    assert {"model", "preprocess", "dataset", "layer", "pool", "resolved"} <= set(meta)


class _Stop(Exception):
    pass


def test_interrupted_extraction_resumes_without_redoing_finished_shards(tmp_path):
    root = make_folder(tmp_path / "data", per_class=8)  # 24 images, 6 shards of 4
    model = tiny()
    ds = scan_image_folder(root)
    cache = tmp_path / "cache"

    def interrupt(s):
        if s == 1:
            raise _Stop

    def extract(on_shard, cache_dir=cache):
        return extract_features(model, ds, ["conv2", "conv3"], cache_dir=cache_dir, shard_size=4,
                                batch_size=3, on_shard=on_shard)  # fmt: skip

    with pytest.raises(_Stop):
        extract(interrupt)
    done = sorted(p.name for p in cache.glob("*/features.relu3-*/shard-*.npy"))
    assert done == ["shard-00000.npy", "shard-00001.npy"]
    stamps = {p: p.stat().st_mtime_ns for p in cache.glob("*/*/shard-*.npy")}
    redone = []
    resumed = extract(redone.append)
    assert redone == [2, 3, 4, 5] and resumed.computed_shards == [2, 3, 4, 5]
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    whole = extract(None, tmp_path / "fresh")
    for layer in ("conv2", "conv3"):
        np.testing.assert_array_equal(np.asarray(resumed[layer]), np.asarray(whole[layer]))
    assert not list(cache.rglob("*.tmp"))  # no half-written shard left behind


def test_unreadable_image_is_a_nan_row_and_reported(tmp_path):
    root = make_folder(tmp_path / "data", per_class=4)
    (root / "class1" / "zz_broken.png").write_bytes(b"not a png")
    (root / "class1" / "notes.txt").write_text("ignored: not an image extension")
    ds = scan_image_folder(root)
    assert len(ds) == 13
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        feats = extract_features(tiny(), ds, ["conv3"], cache_dir=tmp_path / "c")
    assert any(
        issubclass(w.category, SkippedImageWarning) and "zz_broken" in str(w.message)
        for w in caught
    )
    assert feats.skipped == ["class1/zz_broken.png"]
    assert int((~feats.valid).sum()) == 1 and np.isnan(np.asarray(feats["conv3"])[8]).all()
    again = extract_features(tiny(), ds, ["conv3"], cache_dir=tmp_path / "c")
    assert again.from_cache and again.skipped == ["class1/zz_broken.png"]


def test_image_folder_errors(tmp_path):
    with pytest.raises(ConvlensError, match="not a folder"):
        scan_image_folder(tmp_path / "missing")
    (tmp_path / "one" / "a").mkdir(parents=True)
    with pytest.raises(ConvlensError, match="at least two"):
        scan_image_folder(tmp_path / "one")
    (tmp_path / "one" / "b").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "one" / "a" / "x.png")
    with pytest.raises(ConvlensError, match="no image files"):
        scan_image_folder(tmp_path / "one")


def test_sharded_features_index_like_one_array():
    parts = [np.arange(12, dtype=np.float32).reshape(4, 3) + 100 * k for k in range(3)]
    whole = np.concatenate(parts)
    sf = ShardedFeatures(parts)
    idx = np.array([11, 0, 5, 4, 7, 3])
    np.testing.assert_array_equal(sf[idx], whole[idx])
    np.testing.assert_array_equal(sf[2:9], whole[2:9])
    np.testing.assert_array_equal(sf[-1], whole[-1])
    assert sf.shape == (12, 3) and np.asarray(sf).shape == (12, 3)
    with pytest.raises(IndexError):
        sf[np.array([12])]


def test_default_layers_spread_through_the_network():
    from convlens.models import create_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zf = create_model("zfnet_mini")
    # zfnet/alexnet: the paper's layers (Table 7), by alias
    assert candidate_layers(zf) == ["conv1", "conv2", "conv3", "conv4", "conv5", "pool5",
                                    "fc6", "fc7"]  # fmt: skip
    model, shape = tiny_model("resnet")
    # no aliases: the end of each resolution stage, then the pre-logits vector
    assert candidate_layers(model, torch.zeros(shape)) == ["pw", "se"]
    deep = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 16
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 2
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3),
    )  # fmt: skip
    x = torch.zeros(1, 3, 32, 32)
    assert candidate_layers(deep, x) == ["1", "4", "7", "10", "13", "14", "17"]
    assert default_layers(deep, 4, x) == ["1", "7", "13", "17"]


def _dist_worker(rank: int, world: int, init: str, root: str, cache: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        feats = extract_features(
            tiny(),
            scan_image_folder(root),
            ["conv2", "conv3"],
            cache_dir=cache,
            shard_size=4,
            batch_size=4,
        )
        np.save(Path(out) / f"rank{rank}.npy", np.asarray(feats["conv3"]))
        Path(out, f"rank{rank}.json").write_text(
            json.dumps(
                {"computed": feats.computed_shards, "world": feats.world_size, "rank": feats.rank}
            )
        )
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_write_their_shards_of_one_cache(tmp_path):
    import torch.multiprocessing as mp

    root = make_folder(tmp_path / "data", per_class=7)  # 21 images: 6 shards of 4
    out = tmp_path / "out"
    out.mkdir()
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(
        _dist_worker,
        args=(2, init, str(root), str(tmp_path / "cache"), str(out)),
        nprocs=2,
        join=True,
    )

    def extract(cache_dir):
        return extract_features(tiny(), scan_image_folder(root), ["conv2", "conv3"],
                                cache_dir=cache_dir, shard_size=4, batch_size=4)  # fmt: skip

    single = extract(tmp_path / "single")
    for rank in (0, 1):
        info = json.loads((out / f"rank{rank}.json").read_text())
        assert info == {
            "computed": [s for s in range(6) if s % 2 == rank],
            "world": 2,
            "rank": rank,
        }
        np.testing.assert_allclose(
            np.load(out / f"rank{rank}.npy"), np.asarray(single["conv3"]), rtol=1e-6, atol=1e-6
        )
    # the ranks' cache is complete: a plain run reads it without computing anything
    again = extract(tmp_path / "cache")
    assert again.from_cache
