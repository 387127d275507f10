"""The zeiler-fergus recipe end to end on a tiny miniature: resume equivalence, 2-process gloo DDP
against one process, the CLI's files and report, the probes called through the plugin system."""

from __future__ import annotations

import json
import os
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from convlens_zeiler_fergus.analysis import load_trained, probe_model, run_probes
from convlens_zeiler_fergus.checkpoint import load_checkpoint
from convlens_zeiler_fergus.config import TrainConfig
from convlens_zeiler_fergus.data import prepare_data
from convlens_zeiler_fergus.distributed import DistEnv, setup, teardown
from convlens_zeiler_fergus.experiments import build_model
from convlens_zeiler_fergus.synthetic import write_image_folder
from convlens_zeiler_fergus.train import Trainer, read_metrics

import convlens
from convlens.data import Preprocess
from tests.conftest import run_cli

TINY = {
    "mini_train_per_class": 8,
    "mini_val_per_class": 2,
    "width_mult": 0.0625,
    "batch_size": 16,
    "epochs": 2,
    "log_every": 1,
    "ckpt_every_steps": 2,
    "train_eval_images": 24,
    "evolution_images": 16,
    "probes": [],
    "workers": 0,
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("zf")
    cfg = TrainConfig.miniature(**TINY)
    data = write_image_folder(
        root / "data",
        cfg.mini_train_per_class,
        cfg.mini_val_per_class,
        cfg.mini_image_size,
        cfg.mini_data_seed,
    )
    cfg = cfg.replace(data=str(data), cache_dir=str(root / "cache"))
    return cfg, prepare_data(cfg, DistEnv(), torch.device("cpu")), root


def _losses(run: Path) -> list[tuple[int, float]]:
    return [
        (r["global_step"], r["loss"])
        for r in read_metrics(run / "metrics.jsonl")
        if r["kind"] == "step"
    ]


class _Crash(Exception):
    pass


def test_resume_after_a_mid_epoch_crash_reproduces_the_loss_curve(tiny, tmp_path: Path) -> None:
    cfg, bundle, _ = tiny
    assert len(bundle.train) // cfg.batch_size == 6 and bundle.source == "pack"
    a = Trainer(cfg, tmp_path / "a", bundle, progress=False).fit()
    assert a.epochs_done == 2 and a.global_step == 12

    def crash(step: int) -> None:
        if step == 10:  # epoch 2, step 4: after the checkpoint of step 8 and the record of 9
            raise _Crash

    with pytest.raises(_Crash):
        Trainer(cfg, tmp_path / "b", bundle, progress=False).fit(on_step=crash)
    ckpt = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    assert (ckpt["epoch"], ckpt["step"], ckpt["global_step"]) == (1, 2, 8)
    assert ckpt["sampler"]["position"] == 2 and len(ckpt["rng"]["torch_cpu"]) == 1
    assert [s for s, _ in _losses(tmp_path / "b")][-1] == 9
    with pytest.raises(convlens.ConvlensError, match="--resume"):
        Trainer(cfg, tmp_path / "b", bundle, progress=False).fit()
    b = Trainer(cfg, tmp_path / "b", bundle, progress=False).fit(resume=True)
    assert b.global_step == 12
    la, lb = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert [s for s, _ in lb] == list(range(1, 13))  # the records after the checkpoint were dropped
    assert la == lb  # bit for bit: same batches, crops, dropout masks, momentum
    ea = [r for r in read_metrics(tmp_path / "a" / "metrics.jsonl") if r["kind"] == "epoch"]
    eb = [r for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if r["kind"] == "epoch"]
    assert [(r["train_loss"], r["val_top1_err"]) for r in ea] == [
        (r["train_loss"], r["val_top1_err"]) for r in eb
    ]
    wa = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")["model"]
    wb = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # Fig. 4 snapshots at the scaled epochs (2 epochs: 1 and 2)
    assert sorted(p.name for p in (tmp_path / "a" / "snapshots").iterdir()) == [
        "epoch_001.pt",
        "epoch_002.pt",
    ]


def test_folder_and_device_decode_paths_train_like_the_pack(tiny, tmp_path: Path) -> None:
    cfg, bundle, _ = tiny
    one = cfg.replace(epochs=1)
    Trainer(one, tmp_path / "pack", bundle, progress=False).fit()
    losses = {}
    for decode in ("cpu", "device"):
        c = one.replace(pack=False, decode=decode, cache_dir=str(tmp_path / decode))
        if decode == "device":  # the GPU decode path, run on the CPU
            with pytest.warns(UserWarning, match="without CUDA"):
                b = prepare_data(c, DistEnv(), torch.device("cpu"))
        else:
            b = prepare_data(c, DistEnv(), torch.device("cpu"))
        assert b.source == {"cpu": "folder", "device": "device-decode"}[decode]
        # the mean image from a pass over the files equals the one computed while packing
        torch.testing.assert_close(b.mean_image, bundle.mean_image)
        Trainer(c, tmp_path / decode, b, progress=False).fit()
        losses[decode] = [v for _, v in _losses(tmp_path / decode)]
    assert losses["cpu"] == [v for _, v in _losses(tmp_path / "pack")]  # same crops, same steps
    assert len(losses["device"]) == 6 and all(np.isfinite(losses["device"]))


def _ddp_worker(rank: int, init_file: str, cfg_dict: dict, run_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    torch.set_num_threads(1)
    dist, device = setup(torch.device("cpu"), init_method=f"file://{init_file}")
    try:
        assert dist.enabled and dist.world_size == 2 and dist.backend == "gloo"
        cfg = TrainConfig.from_dict(cfg_dict)
        bundle = prepare_data(cfg, dist, device)
        Trainer(cfg, run_dir, bundle, dist, device, progress=False).fit()
    finally:
        teardown(dist)


def test_two_process_gloo_ddp_agrees_with_one_process(tiny, tmp_path: Path) -> None:
    # dropout draws differ per rank by design; without it the two runs compute the same
    # full-batch gradients (each rank half the batch, averaged by DDP)
    cfg, bundle, _ = tiny
    cfg = cfg.replace(dropout=0.0, epochs=1)
    Trainer(cfg, tmp_path / "single", bundle, progress=False).fit()
    mp.spawn(
        _ddp_worker,
        args=(str(tmp_path / "init"), cfg.to_dict(), str(tmp_path / "ddp")),
        nprocs=2,
        join=True,
    )
    ls, ld = _losses(tmp_path / "single"), _losses(tmp_path / "ddp")
    assert [s for s, _ in ld] == [s for s, _ in ls] == list(range(1, 7))
    np.testing.assert_allclose([v for _, v in ld], [v for _, v in ls], rtol=1e-4)
    ws = load_checkpoint(tmp_path / "single" / "checkpoints" / "last.pt")
    wd = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.pt")
    assert len(wd["rng"]["torch_cpu"]) == 2  # every rank's RNG state is kept
    for k in ws["model"]:
        torch.testing.assert_close(wd["model"][k], ws["model"][k], rtol=1e-4, atol=1e-6)
    es = [r for r in read_metrics(tmp_path / "single" / "metrics.jsonl") if r["kind"] == "epoch"]
    ed = [r for r in read_metrics(tmp_path / "ddp" / "metrics.jsonl") if r["kind"] == "epoch"]
    assert es[0]["val_top1_err"] == ed[0]["val_top1_err"]  # sharded eval, gathered


def test_probe_model_sees_exactly_the_training_input(tiny, tmp_path: Path) -> None:
    cfg, bundle, root = tiny
    torch.manual_seed(0)
    net = build_model(cfg, 12).eval()
    pm = probe_model(net, bundle.mean_image, bundle.classes)
    path = bundle.val_split.samples[0][0]
    from PIL import Image

    x = Preprocess.for_model(pm)(Image.open(path))[None]
    # the training path: 72x72 crop (uint8), minus the per-pixel mean, centre 64x64
    from convlens_zeiler_fergus.data import load_square

    crop = torch.from_numpy(load_square(path, 72)).float() - bundle.mean_image
    ref = net(crop[None, :, 4:68, 4:68])
    torch.testing.assert_close(pm(x), ref, rtol=1e-4, atol=1e-4)
    assert pm.convlens_aliases["conv5"] == "features.relu5"
    torch.fx.symbolic_trace(pm)  # the occlusion probe's incremental path traces models
    # "zero" in model space is the dataset's mean colour (the grey of occluders)
    mean_rgb = bundle.mean_image.mean(dim=(1, 2)) / 255
    assert Preprocess.for_model(pm).to_model_space(mean_rgb.tolist()) == pytest.approx(
        (0, 0, 0), abs=1e-4
    )


def test_run_probes_skips_missing_and_failing_probes(tiny, tmp_path: Path, isolated_host) -> None:
    cfg, bundle, _ = tiny

    class Good(convlens.Probe):
        name = "good"
        options = (convlens.Option("k", int, 1),)

        def run(self, ctx):
            return convlens.ProbeResult(
                self.name, summary={"k": ctx.options["k"], "n": len(ctx.images)}
            )

    class Bad(convlens.Probe):
        name = "bad"

        def run(self, ctx):
            raise RuntimeError("boom")

    plugin = types.SimpleNamespace()

    @convlens.hookimpl
    def convlens_register_probes(registry):
        registry.register("good", Good)
        registry.register("bad", Bad)

    plugin.convlens_register_probes = convlens_register_probes
    isolated_host(("fakes", plugin))
    pm = probe_model(build_model(cfg, 12), bundle.mean_image, bundle.classes)
    images = [Path(p) for p, _ in bundle.val_split.samples[:2]]
    recs = run_probes(
        pm,
        images,
        tmp_path / "probes",
        "cpu",
        ["good", "bad", "deconv"],
        options={"good": {"k": 3}},
    )
    by = {r["probe"]: r for r in recs}
    assert by["good"]["status"] == "ok" and by["good"]["summary"] == {"k": 3, "n": 2}
    assert by["bad"]["status"] == "failed" and "boom" in by["bad"]["error"]
    assert by["deconv"]["status"] == "not installed"
    assert json.loads((tmp_path / "probes" / "probes.json").read_text())["probes"][1]["status"] == (
        "failed"
    )


def test_cli_miniature_writes_checkpoints_metrics_and_report(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [
        "recipe",
        "zeiler-fergus",
        "--out",
        str(out),
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--probes",
        "none",
        "--quiet",
    ]
    for k in (
        "mini_train_per_class=8",
        "mini_val_per_class=2",
        "width_mult=0.0625",
        "train_eval_images=16",
        "evolution_images=0",
        "log_every=2",
    ):
        args += ["--set", k]
    env = {"OMP_NUM_THREADS": "1"}
    r = run_cli(args, timeout=240, env=env)
    assert r.returncode == 0, r.stderr
    assert "val top-1 err" in r.stdout and "report" in r.stdout
    run = out / "zfnet"
    for f in (
        "config.json",
        "metrics.jsonl",
        "checkpoints/last.pt",
        "model.pt",
        "eval.json",
        "val_probs.npy",
        "figures/filters_conv1.png",
        "snapshots/epoch_001.pt",
    ):
        assert (run / f).is_file(), f
    ev = json.loads((run / "eval.json").read_text())
    assert ev["val"]["n"] == 24 and ev["val"]["crops"] == 10 and ev["epochs"] == 1
    html = (out / "report" / "index.html").read_text()
    assert "Table 2" in html and "Table 3" in html and "38.4" in html  # the paper's Fig. 3 row
    assert f"{ev['val']['top1_err']:.2f}" in html  # ours, from this run's eval.json
    assert json.loads((run / "config.json").read_text())["batch_size"] == 16
    model = load_trained(run / "model.pt")  # weights_only, ready for the probes
    assert model.convlens_info.num_classes == 12
    # the documented command loads the miniature's own weights (its config is in the file)
    from convlens.models import create_model

    raw = create_model("zfnet", weights=run / "model.pt")
    assert raw.convlens_info.num_classes == 12 and not raw.convlens_info.random_init
    sd = torch.load(run / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(v, sd[k]) for k, v in raw.state_dict().items())
    layers = run_cli(["layers", "--model", "zfnet", "--weights", str(run / "model.pt")],
                     timeout=240, env=env)  # fmt: skip
    assert layers.returncode == 0, layers.stderr[-2000:]
    # never overwrite progress silently
    again = run_cli(args, timeout=240, env=env)
    assert again.returncode == 2 and "--resume" in again.stderr
