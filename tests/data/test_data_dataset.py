"""DATASET: folder trees (any depth) and WebDataset-style .tar shards read as one indexed stream;
corrupt shards and empty datasets are one-line errors naming them."""

from __future__ import annotations

import io
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convlens.data import SkippedImageWarning, open_dataset
from convlens.data.dataset import expand_braces
from convlens.errors import ConvlensError


def _png(i: int) -> bytes:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _shard(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _pixels(ds, indices=None):
    return [(i, np.asarray(img).tobytes()) for i, img in ds.iter_images(indices)]


def test_tar_shards_stream_the_same_images_as_a_folder_tree(tmp_path):
    tree = tmp_path / "tree"
    for i in range(7):
        d = tree / f"class{i % 2}" / ("deep/er" if i % 3 == 0 else "")
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:03d}.png").write_bytes(_png(i))
    folder = open_dataset(tree)
    assert len(folder) == 7
    members = [(str(it.path.relative_to(tree)), it.path.read_bytes()) for it in folder.items]
    # WebDataset samples: an image and its label; the label members are not images
    shard_members = []
    for name, data in members:
        key = name.rsplit(".", 1)[0]
        shard_members += [(name, data), (f"{key}.cls", b"1")]
    _shard(tmp_path / "data-000.tar", shard_members[:6])
    _shard(tmp_path / "data-001.tar", shard_members[6:])
    shards = open_dataset(str(tmp_path / "data-{000..001}.tar"))
    assert len(shards) == 7 and len(shards.shards) == 2
    assert [n.split(":", 1)[1] for n in shards.names] == [m[0] for m in members]
    assert [p for _, p in _pixels(shards)] == [p for _, p in _pixels(folder)]
    # a subset, across both shards, decodes only those
    assert [i for i, _ in _pixels(shards, [1, 4, 6])] == [1, 4, 6]
    assert _pixels(shards, [1, 4, 6]) == [_pixels(folder)[i] for i in (1, 4, 6)]
    assert shards.fingerprint() == open_dataset(str(tmp_path / "data-{000..001}.tar")).fingerprint()


def test_brace_patterns_expand_like_webdataset():
    assert expand_braces("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert expand_braces("x{1..2}y{8..9}") == ["x1y8", "x1y9", "x2y8", "x2y9"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_an_unreadable_member_is_skipped_with_a_warning(tmp_path):
    shard = _shard(tmp_path / "s.tar", [("a.png", _png(0)), ("b.jpg", b"junk"), ("c.png", _png(2))])
    ds = open_dataset(shard)
    with pytest.warns(SkippedImageWarning, match=r"s\.tar:b\.jpg"):
        got = [i for i, _ in ds.iter_images()]
    assert got == [0, 2]


def test_bad_datasets_are_one_line_errors_naming_them(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConvlensError, match=r"empty.*no images found"):
        open_dataset(tmp_path / "empty")
    with pytest.raises(ConvlensError, match=r"missing: no such file or folder"):
        open_dataset(tmp_path / "missing")
    bad = tmp_path / "garbage.tar"
    bad.write_bytes(b"\x00\x01not a tar at all" * 50)
    with pytest.raises(ConvlensError, match=r"garbage\.tar: not a readable tar shard"):
        open_dataset(bad)
    # a shard cut in the middle of a member: the headers list it, the stream fails on it
    good = _shard(tmp_path / "good.tar", [("a.png", _png(0)), ("b.png", _png(1) * 40)])
    cut = tmp_path / "cut.tar"
    cut.write_bytes(good.read_bytes()[:1200])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = open_dataset(cut)
        except ConvlensError as exc:
            assert "cut.tar" in str(exc)
            return
        with pytest.raises(ConvlensError, match=r"cut\.tar"):
            list(ds.iter_images())
