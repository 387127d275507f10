"""Top-k mining (Fig. 2, Section 4): streaming result == a naive sort of every activation;
memory bounded by k x channels; the torch.distributed merge == a single process."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from convlens_deconv import mine_topk
from PIL import Image

from convlens.data import Preprocess, SkippedImageWarning
from convlens.engine import record
from convlens.errors import ConvlensError, ImageError
from convlens.testing import tiny_model

PRE = Preprocess(input_size=(32, 32), resize=32)


pytestmark = pytest.mark.usefixtures("one_thread")


def _folder(root: Path, n: int, size: int = 32, seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"im{i:05d}.png")
    return root


def _naive_topk(act: torch.Tensor, channel: int, k: int, per_image: int):
    """Every (value, image, y, x) of a channel, at most ``per_image`` per image, sorted by value
    descending, then image, then position — in plain Python."""
    rows = []
    w = act.shape[-1]
    for i in range(act.shape[0]):
        flat = act[i, channel].flatten().tolist()
        best = sorted(range(len(flat)), key=lambda p: (-flat[p], p))[:per_image]
        rows += [(flat[p], i, p // w, p % w) for p in best]
    rows.sort(key=lambda r: (-r[0], r[1], r[2] * w + r[3]))
    return rows[:k]


@pytest.mark.parametrize("per_image", [1, 3])
def test_streaming_topk_equals_a_naive_sort(per_image):
    model, shape = tiny_model("chain")
    x = torch.randn(23, *shape[1:], generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), record(model, ["conv2"], switches=False, trace=False) as rec:
        model(x)
    act = rec["conv2"]
    top = mine_topk(model, "conv2", x, channels=[0, 5, 11], k=7, per_image=per_image, batch_size=4)
    assert top.n_images == 23 and top.channels == [0, 5, 11]
    for row, ch in enumerate(top.channels):
        ref = _naive_topk(act, ch, 7, per_image)
        assert top.image[row].tolist() == [r[1] for r in ref]
        assert top.y[row].tolist() == [r[2] for r in ref]
        assert top.x[row].tolist() == [r[3] for r in ref]
        np.testing.assert_allclose(top.values[row].numpy(), [r[0] for r in ref], rtol=1e-6)
    if per_image == 1:
        assert all(len(set(top.image[r].tolist())) == 7 for r in range(3))


def test_fewer_images_than_k_pads_and_entries_skip_the_padding():
    model, shape = tiny_model("chain")
    x = torch.randn(3, *shape[1:])
    top = mine_topk(model, "conv3", x, k=5)
    assert top.values.shape == (16, 5)
    assert (top.image[:, 3:] == -1).all() and torch.isinf(top.values[:, 3:]).all()
    assert len(top.entries()) == 16 * 3


def test_mining_a_folder_streams_files_and_skips_unreadable_ones(tmp_path):
    model, _ = tiny_model("chain")
    folder = _folder(tmp_path / "imgs", 6)
    (folder / "broken.png").write_bytes(b"not an image")
    with pytest.warns(SkippedImageWarning, match="broken.png"):
        top = mine_topk(model, "conv3", folder, channels=[1, 2], k=3, preprocess=PRE, batch_size=4)
    assert top.n_images == 6 and len(top.files) == 7
    paths = {top.path(i).name for i in top.image.flatten().tolist()}
    assert "broken.png" not in paths and paths <= {f"im{i:05d}.png" for i in range(6)}
    with pytest.raises(ImageError):
        mine_topk(model, "conv3", [folder / "broken.png"], preprocess=PRE)
    with pytest.raises(ConvlensError, match="channel 99"):
        mine_topk(model, "conv3", folder, channels=[99], preprocess=PRE)


def _dist_worker(rank: int, world: int, folder: str, out: str, rdzv: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world)
    try:
        model, _ = tiny_model("chain")
        top = mine_topk(
            model, "conv2", folder, channels=[0, 3, 7, 9], k=5, preprocess=PRE, batch_size=3
        )
        torch.save(
            {
                "values": top.values,
                "image": top.image,
                "y": top.y,
                "x": top.x,
                "n": top.n_images,
                "world": top.world_size,
            },
            f"{out}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_distributed_merge_over_gloo_equals_a_single_process(tmp_path):
    import torch.multiprocessing as mp

    folder = _folder(tmp_path / "imgs", 11, seed=1)
    mp.spawn(
        _dist_worker,
        args=(2, str(folder), str(tmp_path), str(tmp_path / "rdzv")),
        nprocs=2,
        join=True,
    )
    model, _ = tiny_model("chain")
    single = mine_topk(
        model, "conv2", folder, channels=[0, 3, 7, 9], k=5, preprocess=PRE, batch_size=4
    )
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["world"] == 2 and got["n"] == 11
        assert torch.equal(got["image"], single.image)
        assert torch.equal(got["y"], single.y) and torch.equal(got["x"], single.x)
        torch.testing.assert_close(got["values"], single.values)
    # the shards really were different: each rank alone sees only part of the winners
    assert len(set(single.image.flatten().tolist()) & set(range(0, 11, 2))) > 0
    assert len(set(single.image.flatten().tolist()) & set(range(1, 11, 2))) > 0


# VmHWM (peak RSS of this address space, reset by exec): getrusage's ru_maxrss survives exec on
# Linux, so a child would report pytest's own peak and the check would pass vacuously.
_RSS_CHILD = r"""
import sys, warnings
warnings.simplefilter("ignore")
import torch
torch.set_num_threads(1)
from convlens.data import Preprocess
from convlens.testing import tiny_model
from convlens_deconv import mine_topk
model, _ = tiny_model("chain")
pre = Preprocess(input_size=(112, 112), resize=112)  # 150 KB per input: a leak would show

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

print(0, hwm())
for folder in sys.argv[1:]:
    top = mine_topk(model, "conv2", folder, k=9, preprocess=pre, batch_size=50)
    print(top.n_images, hwm())
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM (Linux)")
def test_peak_memory_does_not_grow_with_the_number_of_images(tmp_path):
    """One fresh process mines 200 images, then 2,000 (inputs of 112x112, so that holding them
    would show): its peak RSS after the 2,000 is within 10% of the peak after the 200 (memory is
    bounded by k x channels, not by the number of images)."""
    import os

    big = _folder(tmp_path / "big", 2000, size=16)
    small = tmp_path / "small"
    small.mkdir()
    for p in sorted(big.iterdir())[:200]:
        os.link(p, small / p.name)
    res = subprocess.run(
        [sys.executable, "-c", _RSS_CHILD, str(small), str(big)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    (_, base), (n1, peak1), (n2, peak2) = (
        [int(v) for v in line.split()] for line in res.stdout.strip().splitlines()
    )
    assert (n1, n2) == (200, 2000)
    assert peak1 >= base > 50_000  # a real measurement of this process (KiB)
    assert peak2 <= 1.10 * peak1, (base, peak1, peak2)
    # keeping the 1,800 extra inputs would cost 1,800 x 3 x 112 x 112 x 4 B = 271 MB
    assert (peak2 - peak1) * 1024 < 0.25 * 1800 * 3 * 112 * 112 * 4, (base, peak1, peak2)
