"""``convlens atlas`` (issue #13) on a tiny seeded convnet: every unit page's top-k against an
independent recomputation from plain forward hooks; every relative link resolves; images are
files, never inlined; a killed run resumes to byte-identical JSON; two gloo ranks = one process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import warnings
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convlens.testing import tiny_probe_model

REPO = Path(__file__).resolve().parents[2]
N_IMAGES = 22


def make_images(root: Path, n: int = N_IMAGES) -> Path:
    """Seeded textures in a tree two folders deep (an ImageFolder-like layout)."""
    rng = np.random.default_rng(3)
    for i in range(n):
        d = root / f"class{i % 3}" / "sub"
        d.mkdir(parents=True, exist_ok=True)
        yy, xx = np.mgrid[0:40, 0:40]
        base = np.stack([np.sin(xx / (2 + i % 5) + i), np.cos(yy / (2 + i % 4)), np.sin(
            (xx + yy) / (3 + i % 3))], -1) * 110 + 128  # fmt: skip
        arr = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(d / f"img{i:03d}.png")
    return root


def _build(out: Path, images: Path, **kw):
    from convlens.cli.atlas import run_atlas

    torch.set_num_threads(1)  # the same reductions in every process of these tests
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opts = {"units": "0-3", "top": 9, "batch_size": 4, "checkpoint_every": 8, **kw}
        return run_atlas(tiny_probe_model("chain"), out, images=[str(images)], device="cpu", **opts)


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    root = tmp_path_factory.mktemp("atlas")
    images = make_images(root / "images")
    n = torch.get_num_threads()
    try:
        result = _build(root / "out", images)
    finally:
        torch.set_num_threads(n)
    return {"root": root, "images": images, "out": root / "out", "site": root / "out" / "atlas",
            "result": result}  # fmt: skip


def _layers(site: Path) -> list[dict]:
    doc = json.loads((site / "atlas.json").read_text())
    return [json.loads((site / ld["dir"] / "layer.json").read_text()) for ld in doc["layers"]]


def test_every_unit_page_shows_the_top_k_of_plain_forward_hooks(atlas):
    site = atlas["site"]
    model = tiny_probe_model("chain")
    files = sorted(atlas["images"].rglob("*.png"))  # the dataset's order: folders walked sorted
    from convlens.data import Preprocess, load_image

    pre = Preprocess.for_model(model)
    x = torch.stack([pre(load_image(f)) for f in files])
    layers = _layers(site)
    assert [ld["layer"] for ld in layers] == ["conv1", "conv2", "conv3"]
    seen: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(ld["resolved"]).register_forward_hook(
        lambda m, i, o, name=ld["layer"]: seen.__setitem__(name, o.detach().clone()))
        for ld in layers]  # fmt: skip
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    for ld in layers:
        per_image = seen[ld["layer"]].flatten(2).max(2).values  # [N, C]: each image's strongest
        assert [u["unit"] for u in ld["unit_pages"]] == [0, 1, 2, 3]
        for u in ld["unit_pages"]:
            v = per_image[:, u["unit"]].tolist()
            ref = sorted(range(len(files)), key=lambda i: (-v[i], i))[:9]
            assert [t["image"] for t in u["top"]] == [str(files[i]) for i in ref]
            np.testing.assert_allclose([t["activation"] for t in u["top"]], [v[i] for i in ref],
                                       rtol=1e-6)  # fmt: skip
            # the page shows the same images and values, in the same order
            page = (site / ld["dir"] / u["files"]["page"]).read_text()
            names = re.findall(r"<td title='([^']*)'>", page)
            assert names == [str(files[i]) for i in ref]
            assert f"{v[ref[0]]:.4g}" in page
            # the distribution summary is the recomputed one
            s = u["summary"]
            assert s["images"] == len(files)
            assert s["max_max"] == pytest.approx(max(v), rel=1e-6)
            assert s["rate"] == pytest.approx(
                float((seen[ld["layer"]][:, u["unit"]] > 0).double().mean()), rel=1e-6
            )
            for f in u["files"].values():
                assert (site / ld["dir"] / f).is_file()


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str]] = []

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ("href", "src") and v is not None:
                self.refs.append((tag, v))


def test_every_relative_link_of_the_site_resolves_to_a_file(atlas):
    pages = sorted(atlas["site"].rglob("*.html"))
    assert len(pages) == 1 + 3 + 12  # index, three layer pages, four units each
    count = 0
    for page in [*pages, atlas["out"] / "index.html"]:
        p = _Links()
        p.feed(page.read_text())
        for tag, ref in p.refs:
            assert not re.match(r"^[a-z]+://", ref) and not ref.startswith("//"), (page, ref)
            if ref.startswith("#"):  # an anchor on the same page (the report's navigation)
                assert f'id="{ref[1:]}"' in page.read_text(), (page, ref)
                continue
            if ref.startswith("data:"):
                assert tag == "link" and ref == "data:,", (page, ref)  # only the empty favicon
                continue
            target = (page.parent / ref.split("#")[0]).resolve()
            assert target.is_file(), f"{page}: {ref} -> {target}"
            count += 1
    assert count > 100
    assert "atlas/index.html" in (atlas["out"] / "index.html").read_text()  # the report links it


def test_figures_are_files_written_once_and_readable(atlas):
    site = atlas["site"]
    pngs = sorted(site.rglob("*.png"))
    assert len(pngs) == 12 * 3  # Fig. 2, strongest patch, its projection per unit
    html = "".join(p.read_text() for p in site.rglob("*.html"))
    assert "base64" not in html
    fig = Image.open(next(site.rglob("u0002_fig2.png")))
    assert fig.width >= 500 and fig.height >= 300
    # no empty cell: every tile area of the figure has content (not a blank white block)
    a = np.asarray(fig.convert("L"), dtype=np.float64)
    assert a.std() > 20
    run = json.loads((site / "run.json").read_text())
    assert run["resumed_from_images"] == 0 and run["timings_s"]["pass2_projections"] == 108
    assert not (atlas["out"] / ".atlas-resume").exists()  # checkpoints removed when done


_KILLED = """
import os, signal, sys, warnings
sys.path[:0] = [{repo!r}, {repo!r} + "/plugins", {repo!r} + "/recipes"]
from pathlib import Path
from convlens.data import ImageDataset
from tests.plugins.test_atlas import _build

original = ImageDataset.iter_images

def dying(self, indices=None):
    for n, item in enumerate(original(self, indices)):
        if n == 21:  # pass 1 has checkpointed after 8 and 16 images: die like kill -9
            os.kill(os.getpid(), signal.SIGKILL)
        yield item

ImageDataset.iter_images = dying
_build(Path({out!r}), Path({images!r}))
"""


def test_a_killed_run_resumes_to_byte_identical_json(atlas, tmp_path):
    out = tmp_path / "out"
    script = tmp_path / "killed.py"
    script.write_text(textwrap.dedent(_KILLED.format(repo=str(REPO), out=str(out),
                                                     images=str(atlas["images"]))))  # fmt: skip
    env = {**os.environ, "CONVLENS_NO_PROGRESS": "1"}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=str(REPO))  # fmt: skip
    assert proc.returncode == -9, proc.stderr[-2000:]
    ckpt = out / ".atlas-resume" / "pass1-rank0-of1.pt"
    assert ckpt.is_file() and not (out / "atlas").exists()  # killed: nothing half-written
    n = torch.get_num_threads()
    try:
        result = _build(out, atlas["images"])
    finally:
        torch.set_num_threads(n)
    assert result.resumed_from == 16
    ref, got = atlas["site"], out / "atlas"
    jsons = sorted(p.relative_to(ref) for p in ref.rglob("*.json") if p.name != "run.json")
    assert len(jsons) == 1 + 3 + 1  # atlas.json, layer.json x 3, section.json
    for rel in jsons:
        assert (got / rel).read_bytes() == (ref / rel).read_bytes(), rel
    assert not ckpt.exists()


def _dist_worker(rank: int, world: int, images: str, out: str, rdzv: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world)
    try:
        torch.save(_mine(images), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _mine(images: str) -> dict:
    from convlens_deconv import mine_topk_layers

    from convlens.data import open_dataset

    model = tiny_probe_model("chain")
    # one image per forward pass: the same float32 values in every process (a conv over a batch
    # of 3 may round differently from one over a batch of 2)
    tops = mine_topk_layers(model, ["conv1", "conv3"], open_dataset(images), k=5, batch_size=1,
                            summaries=True, stop_at="conv3")  # fmt: skip
    return {
        lay: {"values": t.values, "image": t.image, "y": t.y, "x": t.x, "n": t.n_images,
              "world": t.world_size, "summary": t.summary.result(),
              "counts": t.summary.sketch.counts}
        for lay, t in tops.items()
    }  # fmt: skip


def test_two_gloo_ranks_mine_what_one_process_mines(atlas, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_dist_worker, args=(2, str(atlas["images"]), str(tmp_path), str(tmp_path / "rdzv")),
             nprocs=2, join=True)  # fmt: skip
    single = _mine(str(atlas["images"]))
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for lay, ref in single.items():
            g = got[lay]
            assert g["world"] == 2 and g["n"] == ref["n"] == N_IMAGES
            for key in ("values", "image", "y", "x", "counts"):
                assert torch.equal(g[key], ref[key]), (lay, key)
            for a, b in zip(g["summary"], ref["summary"], strict=True):
                assert a["quantiles"] == b["quantiles"] and a["rate"] == b["rate"]
                assert a["mean"] == pytest.approx(b["mean"], rel=1e-6)
