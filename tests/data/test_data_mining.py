"""convlens.data.mining: the embedded mining set is many distinct natural crops, cached safely."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import convlens.data as data
from convlens.data import load_image, mining_set, mining_sources
from convlens.data import mining as mining_mod
from convlens.errors import ConvlensError

SMALL = 40  # enough for every source photo to give two crops


# -- helpers -------------------------------------------------------------------------------------


def _manifest(files: list[Path]) -> dict:
    return json.loads((files[0].parent / "manifest.json").read_text(encoding="utf-8"))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def _hidden(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def default_set(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The default set (n=512, 224 px, seed 0), built once for the module."""
    return mining_set(cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return mining_set(n=SMALL, cache_dir=tmp_path_factory.mktemp("small"))


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


# -- the default set -------------------------------------------------------------------------------


def test_public_surface() -> None:
    for name in ("mining_set", "mining_sources", "MiningSource"):
        assert name in data.__all__
        assert getattr(data, name) is getattr(mining_mod, name)


def test_default_set_has_over_500_distinct_crops(default_set: list[Path]) -> None:
    assert len(default_set) == 512
    assert default_set == sorted(default_set)
    folder = default_set[0].parent
    assert folder.name == "mining-v1-n512-s224-seed0"
    assert all(p.parent == folder and p.is_file() for p in default_set)
    for i, p in enumerate(default_set):
        assert re.fullmatch(rf"crop_{i:04d}_[A-Za-z0-9_-]+\.jpg", p.name), p.name
    assert len({_digest(p) for p in default_set}) == 512

    manifest = _manifest(default_set)
    crops = manifest["crops"]
    assert [c["file"] for c in crops] == [p.name for p in default_set]
    keys = {(c["package"], c["path"], *c["box"], c["flipped"]) for c in crops}
    assert len(keys) == 512
    assert all(c["sha256"] == _digest(folder / c["file"]) for c in crops)


def test_default_crops_are_size_x_size_rgb_with_content(default_set: list[Path]) -> None:
    for p in default_set:
        with Image.open(p) as img:
            assert img.format == "JPEG"
            assert img.mode == "RGB"
            assert img.size == (224, 224)
            gray = np.asarray(img.convert("L"), dtype=np.float32)
        assert gray.std() > mining_mod.MIN_CROP_STD * 0.75, p.name  # never a blank square


def test_default_set_spreads_over_many_photos_and_packages(default_set: list[Path]) -> None:
    manifest = _manifest(default_set)
    crops = manifest["crops"]
    per_photo = Counter((c["package"], c["path"]) for c in crops)
    assert len(per_photo) >= mining_mod.MIN_SOURCES
    assert max(per_photo.values()) - min(per_photo.values()) <= 1  # round-robin
    assert len({c["package"] for c in crops}) >= 2
    assert {"scikit-image", "scikit-learn"} <= set(manifest["packages"])

    sources = manifest["sources"]
    assert sum(s["crops"] for s in sources) == 512
    assert {(s["package"], s["path"]) for s in sources} == set(per_photo)
    # crop i comes from photo i % P
    order = [(s["package"], s["path"]) for s in sources]
    for i, c in enumerate(crops):
        assert (c["package"], c["path"]) == order[i % len(order)]


def test_manifest_records_parameters_and_boxes(default_set: list[Path]) -> None:
    manifest = _manifest(default_set)
    assert manifest["schema_version"] == 1
    params = manifest["params"]
    assert (params["n"], params["size"], params["seed"]) == (512, 224, 0)
    assert params["scales"] == list(mining_mod.SCALES)
    dims = {(s["package"], s["path"]): (s["width"], s["height"]) for s in manifest["sources"]}
    flips = Counter(c["flipped"] for c in manifest["crops"])
    assert flips[True] > 100 and flips[False] > 100
    scales = set()
    for c in manifest["crops"]:
        width, height = dims[(c["package"], c["path"])]
        x0, y0, x1, y1 = c["box"]
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        assert x1 - x0 == y1 - y0  # square
        assert c["scale"] == pytest.approx((x1 - x0) / min(width, height), abs=1e-3)
        scales.add(round(c["scale"], 1))
    assert len(scales) >= 4  # several scales


def test_a_crop_is_its_box_of_the_source_photo(small_set: list[Path]) -> None:
    """Re-cut two crops (one flipped, one not) from the source photo: the file matches its box."""
    manifest = _manifest(small_set)
    roots = {s.package: s.path.parents[len(Path(s.relpath).parts) - 1] for s in mining_sources()}
    checked = set()
    for c in manifest["crops"]:
        if c["flipped"] in checked:
            continue
        checked.add(c["flipped"])
        photo = load_image(roots[c["package"]] / c["path"])
        want = photo.resize((224, 224), Image.Resampling.LANCZOS, box=tuple(c["box"]))
        if c["flipped"]:
            want = want.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        got = np.asarray(Image.open(small_set[0].parent / c["file"]), dtype=np.float32)
        assert np.abs(got - np.asarray(want, dtype=np.float32)).mean() < 4.0  # JPEG error only
    assert checked == {True, False}


# -- sources -------------------------------------------------------------------------------------


def test_sources_are_natural_photos_and_the_rule_is_recorded(default_set: list[Path]) -> None:
    sources = mining_sources()
    used = [s for s in sources if s.used]
    assert len(used) >= mining_mod.MIN_SOURCES
    names = {s.name for s in used}
    assert len(names) == len(used)
    assert {"astronaut", "coffee", "chelsea", "camera", "china", "flower"} <= names
    assert "grace_hopper" in names  # matplotlib's sample photo
    for bad in ("chessboard_GRAY", "chessboard_RGB", "color", "logo", "horse", "text", "phantom"):
        assert bad not in names
    for s in used:
        assert s.path.is_file() and min(s.width, s.height) >= mining_mod.MIN_SOURCE_SIDE
    for s in sources:
        if (s.package, s.relpath) in mining_mod.EXCLUDED:
            assert s.reason == mining_mod.EXCLUDED[(s.package, s.relpath)]
    manifest = _manifest(default_set)
    assert [(s["package"], s["path"]) for s in manifest["sources"]] == [
        (s.package, s.relpath) for s in used
    ]
    excluded = {(e["package"], e["path"]): e["reason"] for e in manifest["excluded"]}
    assert excluded == {(s.package, s.relpath): s.reason for s in sources if not s.used}


def test_too_few_photos_is_a_one_line_error(tmp_path: Path, monkeypatch) -> None:
    missing = ["scikit-image (not installed)", "matplotlib (not installed)"]
    monkeypatch.setattr(mining_mod, "_source_folders", lambda: ([], list(missing)))
    with pytest.raises(ConvlensError, match="only 0 source photo") as excinfo:
        mining_set(n=8, cache_dir=tmp_path)
    message = str(excinfo.value)
    assert "\n" not in message
    assert "scikit-image (not installed)" in message
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "kwargs", [{"n": 0}, {"n": True}, {"n": 2.5}, {"size": 0}, {"seed": -1}, {"seed": "1"}]
)
def test_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ConvlensError, match="mining_set "):
        mining_set(cache_dir=tmp_path, **kwargs)


# -- determinism and the cache -----------------------------------------------------------------


def test_same_arguments_give_identical_files(small_set: list[Path], tmp_path: Path) -> None:
    again = mining_set(n=SMALL, cache_dir=tmp_path)
    assert [p.name for p in again] == [p.name for p in small_set]
    manifest = "manifest.json"
    assert (again[0].parent / manifest).read_bytes() == (
        small_set[0].parent / manifest
    ).read_bytes()
    assert [_digest(p) for p in again] == [_digest(p) for p in small_set]
    other = mining_set(n=SMALL, seed=1, cache_dir=tmp_path)
    assert other[0].parent.name.endswith("seed1")
    assert {_digest(p) for p in other}.isdisjoint({_digest(p) for p in small_set})


def test_progress_and_reuse_without_rewriting(tmp_path: Path) -> None:
    calls: list[int] = []
    first = mining_set(n=12, size=64, cache_dir=tmp_path, progress=calls.append)
    assert calls == [1] * 12
    folder = first[0].parent
    before = _mtimes(folder)
    time.sleep(0.01)
    calls.clear()
    second = mining_set(n=12, size=64, cache_dir=tmp_path, progress=calls.append)
    assert second == first
    assert calls == []
    assert _mtimes(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]  # nothing else left


def test_cache_location_and_env(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CONVLENS_CACHE", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    files = mining_set(n=8, size=32)
    assert files[0].parent == tmp_path / "env" / "mining-v1-n8-s32-seed0"
    assert mining_mod.cache_root(tmp_path / "arg") == tmp_path / "arg"  # the argument wins
    monkeypatch.setenv("CONVLENS_CACHE", "")  # empty counts as unset
    assert mining_mod.cache_root() == tmp_path / "xdg" / "convlens"
    monkeypatch.delenv("CONVLENS_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert mining_mod.cache_root() == tmp_path / "home" / ".cache" / "convlens"


def test_file_modes_follow_the_umask(tmp_path: Path, umask_022) -> None:
    files = mining_set(n=8, size=32, cache_dir=tmp_path / "root")
    folder = files[0].parent
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    for p in [*files, folder / "manifest.json"]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p.name


def test_incomplete_final_folder_is_rebuilt(tmp_path: Path) -> None:
    good = mining_set(n=12, size=64, cache_dir=tmp_path)
    folder = good[0].parent
    hashes = [_digest(p) for p in good]
    manifest = folder / "manifest.json"
    text = manifest.read_text(encoding="utf-8")

    def damage_and_rebuild(damage) -> None:
        damage()
        again = mining_set(n=12, size=64, cache_dir=tmp_path)
        assert again == good
        assert [_digest(p) for p in again] == hashes
        assert manifest.read_text(encoding="utf-8") == text
        assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]

    damage_and_rebuild(manifest.unlink)  # crops without a manifest: a half-copied folder
    damage_and_rebuild(lambda: manifest.write_text(text[: len(text) // 2]))  # truncated JSON
    damage_and_rebuild(good[3].unlink)  # a crop missing
    damage_and_rebuild(lambda: good[5].write_bytes(good[5].read_bytes()[:100]))  # a crop cut short
    damage_and_rebuild(lambda: manifest.write_text(text.replace('"n": 12', '"n": 13')))


def test_leftover_staging_folders_are_ignored(tmp_path: Path) -> None:
    name = "mining-v1-n8-s32-seed0"
    fresh = tmp_path / f".{name}.staging-1-dead"
    old = tmp_path / f".{name}.staging-2-dead"
    for leftover in (fresh, old):
        leftover.mkdir(parents=True)
        (leftover / "crop_0000_junk.jpg").write_bytes(b"not a jpeg")
    hours_ago = time.time() - 2 * 3600
    os.utime(old, (hours_ago, hours_ago))
    files = mining_set(n=8, size=32, cache_dir=tmp_path)
    assert files[0].parent == tmp_path / name
    assert all(Image.open(p).size == (32, 32) for p in files)
    assert _hidden(tmp_path) == [fresh.name]  # a live build's folder is left; a dead one swept


def test_an_interrupted_build_leaves_nothing(tmp_path: Path) -> None:
    def interrupt(_: int) -> None:
        if len(seen) == 5:
            raise KeyboardInterrupt
        seen.append(1)

    seen: list[int] = []
    with pytest.raises(KeyboardInterrupt):
        mining_set(n=12, size=32, cache_dir=tmp_path, progress=interrupt)
    assert list(tmp_path.iterdir()) == []
    assert len(mining_set(n=12, size=32, cache_dir=tmp_path)) == 12


def test_a_concurrent_build_that_wins_is_used(tmp_path: Path, monkeypatch) -> None:
    """Another process renames its finished set into place while we build: ours is dropped."""
    theirs = mining_set(n=8, size=32, cache_dir=tmp_path / "theirs")
    final = tmp_path / "ours" / theirs[0].parent.name
    build = mining_mod._build

    def racing_build(staging: Path, *args, **kwargs) -> None:
        build(staging, *args, **kwargs)
        shutil.copytree(theirs[0].parent, final)

    monkeypatch.setattr(mining_mod, "_build", racing_build)
    time.sleep(0.01)
    files = mining_set(n=8, size=32, cache_dir=tmp_path / "ours")
    assert [p.parent for p in files] == [final] * 8
    assert _mtimes(final) == _mtimes(theirs[0].parent)  # their files (copytree keeps mtimes)
    assert _hidden(final.parent) == []  # our staging folder is gone
