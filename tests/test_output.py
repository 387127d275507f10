"""The output contract: a probe's folder holds exactly one run's files (staged, swapped in when
complete), a failed run changes nothing and leaves no debris, and a second run on a folder in
use is refused in one line."""

from __future__ import annotations

import fcntl
import json
import os

import pytest
import torch

import convlens
from convlens.errors import ConvlensError
from convlens.output import LOCK_NAME, output_lock, staged_dir
from convlens.testing import tiny_probe_model


def tiny():
    return tiny_probe_model("chain")


def run(out, images, **kw):
    return convlens.run_probe("occlusion", tiny(), images=images, out=out, device="cpu",
                              window=16, stride=16, **kw)  # fmt: skip


def listing(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def test_a_rerun_with_fewer_images_leaves_only_its_own_files(tmp_path, images):
    torch.set_num_threads(1)
    files = sorted(images.iterdir())
    out = tmp_path / "out"
    run(out, [images])
    assert len(list((out / "occlusion").glob("occlusion_*.png"))) == 3
    res = run(out, [files[0]])
    pngs = sorted(p.name for p in (out / "occlusion").glob("occlusion_*.png"))
    assert pngs == ["occlusion_00_img0.png"]
    run_json = json.loads((out / "occlusion" / "run.json").read_text())
    assert run_json["images"] == [str(files[0])]
    assert all(str(out / "occlusion") in f for f in run_json["files"])
    assert all(p.exists() for p in res.files)
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != LOCK_NAME
                and p.name != ".cache"]  # fmt: skip
    overview = json.loads((out / "overview" / "overview.json").read_text())
    assert [p["image"] for p in overview["predictions"]] == [str(files[0])]
    assert "occlusion_00_img0.png" in (out / "index.html").read_text()


def test_a_failed_run_changes_nothing_and_leaves_no_debris(tmp_path, images):
    out = tmp_path / "out"
    run(out, [images])
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ConvlensError):
        run(out, [images], target=99)  # target >= classes: fails inside the probe
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert not list(out.glob(".*staging*")) and not list(out.glob(".*old*"))


def test_a_second_run_on_a_folder_in_use_is_refused(tmp_path, images):
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another run holds it
    try:
        with pytest.raises(ConvlensError, match="another convlens run is writing there"):
            run(out, [images])
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    assert not (out / "occlusion").exists()
    run(out, [images])  # free again
    assert (out / "occlusion" / "occlusion.json").exists()


def test_staging_swaps_whole_folders_and_the_lock_is_reentrant(tmp_path):
    final = tmp_path / "out" / "probe"
    with output_lock(tmp_path / "out"), output_lock(tmp_path / "out"):
        with staged_dir(final) as d:
            (d / "a.txt").write_text("1")
        with staged_dir(final) as d:
            (d / "b.txt").write_text("2")
        assert listing(final) == ["b.txt"]
        with pytest.raises(RuntimeError), staged_dir(final) as d:
            (d / "c.txt").write_text("3")
            raise RuntimeError("boom")
        assert listing(final) == ["b.txt"]
    # a killed run's staging folder is swept by the next run that takes the lock
    (tmp_path / "out" / ".probe.staging-99999").mkdir()
    with output_lock(tmp_path / "out"):
        assert not (tmp_path / "out" / ".probe.staging-99999").exists()


def test_the_overview_reads_back_the_probes_pass_of_the_first_image(tmp_path, images):
    """The report's overview lists layers and predictions from the traced pass occlusion already
    ran on the same image (``engine.traced_pass``): the run makes no more passes of that image
    with the overview than without it, and the predictions equal the model's own."""
    from convlens.data import Preprocess, load_batch

    first = sorted(images.iterdir())[0]
    counts = []
    for overview in (False, True):
        model = tiny()
        seen: list[torch.Tensor] = []
        model.register_forward_pre_hook(lambda m, a, seen=seen: seen.append(a[0].clone()))
        convlens.run_probe("occlusion", model, images=[first], out=tmp_path / str(overview),
                           device="cpu", window=16, stride=16, overview=overview)  # fmt: skip
        x, _ = load_batch([first], Preprocess.for_model(model))
        counts.append(sum(t.shape == x.shape and torch.equal(t, x) for t in seen))
    assert counts[0] == counts[1] >= 1
    data = json.loads((tmp_path / "True" / "overview" / "overview.json").read_text())
    with torch.no_grad():
        probs = model.eval()(x).softmax(-1)[0]
    top = data["predictions"][0]["top5"][0]
    assert top["class"] == int(probs.argmax()) and top["prob"] == pytest.approx(float(probs.max()))
    leaves = [n for n, m in model.named_modules() if n and not list(m.children())]
    assert [c["name"] for c in data["layers"]][0] == leaves[0]
