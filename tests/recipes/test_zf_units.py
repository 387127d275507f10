"""The zeiler-fergus recipe's parts, each against an independent reference: hand computations,
naive loops, scikit-learn, the paper's numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from convlens_zeiler_fergus import paper
from convlens_zeiler_fergus.checkpoint import check_resume, load_checkpoint, save_checkpoint
from convlens_zeiler_fergus.config import ConfigError, TrainConfig, scaled_snapshot_epochs
from convlens_zeiler_fergus.data import (
    BatchPrep,
    EpochBatchSampler,
    FolderDataset,
    PackedDataset,
    crop_params,
    decode_batch,
    load_square,
    pack,
    scan_split,
)
from convlens_zeiler_fergus.evaluate import ensemble, topk_errors
from convlens_zeiler_fergus.experiments import EXPERIMENTS, build_model
from convlens_zeiler_fergus.recipe import resolve_config
from convlens_zeiler_fergus.train import TrainStep, make_optimizer, renormalize_filters_
from PIL import Image
from torch import nn

from convlens.errors import ConvlensError

# --------------------------------------------------------------------------------------------
# Section 3's feature scale clipping
# --------------------------------------------------------------------------------------------


def test_filter_renormalisation_matches_hand_computation() -> None:
    conv = nn.Conv2d(2, 3, 2)
    with torch.no_grad():
        # filter 0: eight weights of 0.3 -> RMS 0.3 > 0.1: every weight becomes 0.1
        conv.weight[0].fill_(0.3)
        # filter 1: RMS exactly sqrt((4·0.04² + 4·0.02²)/8) = sqrt(0.001) = 0.0316 < 0.1: kept
        conv.weight[1] = torch.tensor(
            [[[0.04, -0.04], [0.04, -0.04]], [[0.02, 0.02], [-0.02, 0.02]]]
        )
        # filter 2: mixed signs, RMS 0.5: scaled by 0.1 / 0.5 = 0.2, signs kept
        conv.weight[2] = torch.tensor([[[0.5, -0.5], [0.5, -0.5]], [[-0.5, 0.5], [0.5, 0.5]]])
        conv.bias.fill_(7.0)
    before = conv.weight.detach().clone().numpy()
    model = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(3, 1, 1))
    with torch.no_grad():
        model[2].weight.fill_(0.05)  # RMS 0.05: untouched
    n = renormalize_filters_(model, 0.1)
    w = conv.weight.detach().numpy()
    # the reference: a loop over filters with the definition written out
    for o in range(3):
        vals = before[o].ravel().tolist()
        rms = math.sqrt(sum(v * v for v in vals) / len(vals))
        expect = [v * 0.1 / rms for v in vals] if rms > 0.1 else vals
        np.testing.assert_allclose(w[o].ravel(), expect, rtol=1e-6, atol=1e-9)
    assert int(n) == 2
    np.testing.assert_allclose(w[0], 0.1, rtol=1e-6)
    np.testing.assert_allclose(w[2].ravel(), 0.2 * before[2].ravel(), rtol=1e-6)
    assert torch.all(conv.bias == 7.0)  # biases are not filters
    assert torch.all(model[2].weight == 0.05)


def test_every_update_leaves_all_conv_filters_within_the_radius() -> None:
    cfg = TrainConfig.miniature(width_mult=0.0625, init_std=0.3)  # RMS 0.3 everywhere at start
    torch.manual_seed(0)
    model = build_model(cfg, 12)
    opt = make_optimizer(model, cfg, fused=False)
    step = TrainStep(model, model, opt, None, 0.1)
    x, y = torch.randn(4, 3, 64, 64) * 50, torch.randint(0, 12, (4,))
    step(x, y)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 5
    for m in convs:
        rms = m.weight.detach().pow(2).mean(dim=(1, 2, 3)).sqrt()
        assert float(rms.max()) <= 0.1 + 1e-6
        assert float(rms.min()) > 0.09  # all were above the radius: all now sit on it


def test_bf16_channels_last_step_agrees_with_fp32() -> None:
    """The GPU path's step (bf16 autocast + channels_last), run on the CPU."""
    cfg = TrainConfig.miniature(width_mult=0.125, dropout=0.0)
    x, y = torch.randn(8, 3, 64, 64) * 40, torch.randint(0, 12, (8,))
    losses, weights = [], []
    for amp, cl in ((None, False), (torch.bfloat16, True)):
        torch.manual_seed(1)
        model = build_model(cfg, 12)
        xx = x
        if cl:
            model = model.to(memory_format=torch.channels_last)
            xx = x.contiguous(memory_format=torch.channels_last)
        opt = make_optimizer(model, cfg, fused=True)
        step = TrainStep(model, model, opt, amp, 0.1)
        losses.append(float(step(xx, y)[0]))
        weights.append(model.classifier.fc8.weight.detach().float().clone())
        if cl:
            assert model.features.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert losses[0] == pytest.approx(math.log(12), abs=0.5)
    assert losses[1] == pytest.approx(losses[0], rel=0.02)
    assert torch.allclose(weights[0], weights[1], atol=5e-3)


# --------------------------------------------------------------------------------------------
# Config, experiments, the paper's numbers
# --------------------------------------------------------------------------------------------


def test_config_defaults_are_section_3_and_unknown_keys_are_errors() -> None:
    c = TrainConfig()
    assert (c.batch_size, c.lr, c.momentum, c.init_std, c.dropout, c.epochs) == (
        128,
        1e-2,
        0.9,
        1e-2,
        0.5,
        70,
    )
    assert (c.resize, c.input_size, c.eval_crops, c.filter_rms_radius, c.lr_factor) == (
        256,
        224,
        10,
        0.1,
        0.1,
    )
    with pytest.raises(ConfigError, match="batch_sze.*batch_size"):
        c.replace(batch_sze=3)
    with pytest.raises(ConfigError, match="no key 'nope'"):
        TrainConfig.from_dict({"nope": 1})
    with pytest.raises(ConfigError, match="eval_crops"):
        c.replace(eval_crops=5)
    m = TrainConfig.miniature()
    assert TrainConfig.from_dict(json.loads(json.dumps(m.to_dict()))) == m


def test_snapshot_epochs_scale_from_70() -> None:
    fig4 = (1, 2, 5, 10, 20, 30, 40, 64)
    assert scaled_snapshot_epochs(fig4, 70) == list(fig4)
    # round(e * 6 / 70): 0.09, 0.17, 0.43, 0.86 -> 1 (at least 1); 1.71 -> 2; 2.57, 3.43 -> 3; 5.49 -> 5
    assert scaled_snapshot_epochs(fig4, 6) == [1, 2, 3, 5]
    assert scaled_snapshot_epochs(fig4, 140) == [2, 4, 10, 20, 40, 60, 80, 128]


def test_resolve_config_precedence_and_parsing(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"lr": 0.5, "epochs": 3}))
    cfg = resolve_config(
        {
            "config": cfg_file,
            "set": ["lr=0.25", "snapshot_epochs=1,3", "flip=false"],
            "epochs": 9,
            "probe_option": ["linear.folds=2", "deconv.layer=conv2"],
        },
        seed=4,
    )
    assert cfg.is_miniature and cfg.lr == 0.25 and cfg.epochs == 9 and cfg.seed == 4
    assert cfg.snapshot_epochs == (1, 3) and cfg.flip is False
    assert cfg.probe_options["linear"]["folds"] == 2
    assert cfg.probe_options["linear"]["data"] == "{val}"  # the miniature's own entry is kept
    assert cfg.probe_options["deconv"] == {"layer": "conv2"}
    full = resolve_config({"data": tmp_path, "probes": "deconv,linear"})
    assert not full.is_miniature and full.epochs == 70 and full.probes == ("deconv", "linear")
    assert resolve_config({"probes": "none"}).probes == ()
    with pytest.raises(ConfigError, match="weight_decy.*weight_decay"):
        resolve_config({"set": ["weight_decy=1"]})
    with pytest.raises(ConfigError, match="not a valid int"):
        resolve_config({"set": ["epochs=many"]})


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_table3_experiments_change_the_architecture_as_named() -> None:
    cfg = TrainConfig.miniature()
    mods = {
        n: dict(build_model(cfg.replace(experiment=n), 10).named_modules()) for n in EXPERIMENTS
    }
    assert "features.conv3" not in mods["alexnet-no-conv34"]
    assert "features.conv4" not in mods["alexnet-no-conv34"]
    assert "classifier.fc7" not in mods["alexnet-no-fc7"]
    assert "classifier.fc6" in mods["alexnet-no-fc7"]
    assert [n for n in mods["alexnet-no-fc67"] if n.startswith("classifier.")] == ["classifier.fc8"]
    assert mods["alexnet"]["features.conv1"].kernel_size == (11, 11)
    assert mods["zfnet"]["features.conv1"].kernel_size == (7, 7)
    assert mods["zfnet"]["features.conv1"].stride == (2, 2)
    # widths: quarter of 512/1024/512 and of 2048/8192
    assert [mods["zfnet-wide"][f"features.conv{i}"].out_channels for i in (3, 4, 5)] == [
        128,
        256,
        128,
    ]
    assert mods["zfnet-fc2048"]["classifier.fc6"].out_features == 512
    assert mods["alexnet-fc8192"]["classifier.fc7"].out_features == 2048
    # every Table 3 row that names an experiment names one that exists
    for row in paper.TABLE2 + paper.TABLE3:
        if row.ours and not row.ours.startswith("ens:"):
            assert row.ours in EXPERIMENTS


def test_fan_in_init_keeps_the_full_models_gain() -> None:
    from convlens_zeiler_fergus.experiments import fan_in_stds

    stds = fan_in_stds(TrainConfig.miniature(), 12)
    # by hand: conv1 3·7·7 at any width -> 0.01; conv2 96·25 vs 24·25 -> 0.01·2; fc6 9216 (6·6·256
    # at 224) vs 64 (1·1·64 at 64) -> 0.01·12; fc8 4096 vs 1024 -> 0.02
    assert stds["features.conv1"] == pytest.approx(0.01)
    assert stds["features.conv2"] == pytest.approx(0.02)
    assert stds["classifier.fc6"] == pytest.approx(0.12)
    assert stds["classifier.fc8"] == pytest.approx(0.02)
    torch.manual_seed(0)
    model = build_model(TrainConfig.miniature(), 12)
    assert float(model.classifier.fc6.weight.detach().std()) == pytest.approx(0.12, rel=0.02)
    assert float(model.features.conv1.weight.detach().std()) == pytest.approx(0.01, rel=0.05)
    fixed = build_model(TrainConfig.miniature(init_rule="fixed", init_std=0.01), 12)
    assert float(fixed.classifier.fc6.weight.detach().std()) == pytest.approx(0.01, rel=0.05)


def test_full_size_zfnet_parameter_count_by_hand() -> None:
    cfg = TrainConfig()
    # Fig. 3: conv 3->96 (7x7), 96->256 (5x5), 256->384, 384->384, 384->256 (3x3), fc 9216->4096
    # ->4096->1000, each with biases
    convs = [(3, 96, 7), (96, 256, 5), (256, 384, 3), (384, 384, 3), (384, 256, 3)]
    fcs = [(9216, 4096), (4096, 4096), (4096, 1000)]
    expect = sum(i * o * k * k + o for i, o, k in convs) + sum(i * o + o for i, o in fcs)
    with torch.device("meta"):  # shapes only
        assert _count_params(build_model(cfg, 1000)) == expect


def test_paper_tables_typed_from_the_text() -> None:
    t2 = {r.label: r for r in paper.TABLE2}
    assert t2["6 convnets, (a) & (b) combined"].test_top5 == 14.8
    assert t2["1 convnet as per Fig. 3"].val_top1 == 38.4
    fig3 = [r for r in paper.TABLE3 if r.ours == "zfnet"][0]
    assert (fig3.train_top1, fig3.val_top1, fig3.val_top5) == (33.1, 38.4, 16.5)
    assert len(paper.TABLE3) == 12 and len(paper.TABLE2) == 10


# --------------------------------------------------------------------------------------------
# Data: order, crops, packs, decode
# --------------------------------------------------------------------------------------------


def test_ddp_ranks_cover_the_single_process_batches_and_resume_skips() -> None:
    n, b = 103, 8
    single = list(EpochBatchSampler(n, b, seed=3, epoch=1))
    assert len(single) == n // b == 12 and all(len(x) == b for x in single)
    assert len({i for x in single for i in x}) == 12 * b  # no repeats within an epoch
    r0 = list(EpochBatchSampler(n, b, 3, 1, rank=0, world=2))
    r1 = list(EpochBatchSampler(n, b, 3, 1, rank=1, world=2))
    assert [a + c for a, c in zip(r0, r1, strict=True)] == single
    assert list(EpochBatchSampler(n, b, 3, 1, start_step=5)) == single[5:]
    assert list(EpochBatchSampler(n, b, 3, 2)) != single  # a new order each epoch
    with pytest.raises(ConvlensError, match="divisible"):
        EpochBatchSampler(n, 9, 3, 1, world=2)


def test_batch_crops_and_ten_views_match_naive_slicing() -> None:
    g = torch.Generator().manual_seed(0)
    s, c = 12, 8
    x8 = torch.randint(0, 256, (5, 3, s, s), dtype=torch.uint8, generator=g)
    mean = torch.rand(3, s, s, generator=g) * 255
    prep = BatchPrep(mean, c, torch.device("cpu"), channels_last=True)
    dy, dx, fl = crop_params(seed=1, epoch=2, step=3, n=5, size=s, crop=c)
    assert int(dy.max()) <= s - c and int(dx.min()) >= 0
    out = prep.crops(x8, dy, dx, fl)
    assert out.shape == (5, 3, c, c) and out.is_contiguous(memory_format=torch.channels_last)
    for i in range(5):
        ref = x8[i].float() - mean
        ref = ref[:, int(dy[i]) : int(dy[i]) + c, int(dx[i]) : int(dx[i]) + c]
        if fl[i]:
            ref = ref.flip(-1)
        torch.testing.assert_close(out[i], ref)
    # Section 3's ten crops: 4 corners + centre, then the same five flipped
    views = list(prep.views(x8, 10))
    assert len(views) == 10
    full = x8.float() - mean
    m, o = s - c, (s - c) // 2
    refs = [full[..., y : y + c, x : x + c] for y, x in ((0, 0), (0, m), (m, 0), (m, m), (o, o))]
    for v, ref in zip(views, refs + [r.flip(-1) for r in refs], strict=True):
        torch.testing.assert_close(v, ref)
    torch.testing.assert_close(next(iter(prep.views(x8, 1))), refs[4])
    # the same step always gets the same crops
    assert torch.equal(crop_params(1, 2, 3, 5, s, c)[0], dy)


def _folder(root: Path, sizes: list[tuple[int, int]], fmt: str = "PNG") -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i, (w, h) in enumerate(sizes):
                arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                arr = np.clip(arr.astype(int) // 2 + 60 * (cls == "b"), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(
                    d / f"{i}.{fmt.lower().replace('jpeg', 'jpg')}", format=fmt, quality=95
                )
    return root


def test_scan_resize_crop_pack_and_mean_image(tmp_path: Path) -> None:
    root = _folder(tmp_path / "d", [(40, 30), (24, 50), (32, 32)])
    train = scan_split(root, "train")
    assert (
        train.classes == ["a", "b"]
        and len(train) == 6
        and train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    )
    # smallest side -> 16, centre 16x16, by hand with PIL for the 40x30 image
    img = Image.open(train.samples[0][0]).convert("RGB")
    w2 = int(16 * 40 / 30)  # 21
    ref = img.resize((w2, 16), Image.Resampling.BILINEAR)
    left = int(round((w2 - 16) / 2.0))
    ref = np.asarray(ref.crop((left, 0, left + 16, 16))).transpose(2, 0, 1)
    np.testing.assert_array_equal(load_square(train.samples[0][0], 16), ref)
    info = pack(train, tmp_path / "pk", 16, shard_size=4)
    assert [s["n"] for s in info["shards"]] == [4, 2] and info["bytes"] == 6 * 3 * 16 * 16
    packed, folder = PackedDataset(tmp_path / "pk"), FolderDataset(train, 16)
    assert len(packed) == 6
    for i in range(6):
        assert torch.equal(packed[i][0], folder[i][0]) and packed[i][1] == folder[i][1]
    items = packed.__getitems__([5, 0, 3])
    assert [it[1] for it in items] == [1, 0, 1] and torch.equal(items[0][0], folder[5][0])
    mean = np.load(tmp_path / "pk" / "mean_image.npy")
    ref_mean = np.mean([load_square(p, 16).astype(np.float64) for p, _ in train.samples], 0)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-6)
    with pytest.raises(ConvlensError, match="not a training class"):
        (root / "val" / "zz").mkdir()
        scan_split(root, "val", train.classes)


def test_device_decode_path_agrees_with_pil(tmp_path: Path) -> None:
    root = _folder(tmp_path / "j", [(48, 36), (30, 60)], fmt="JPEG")
    split = scan_split(root, "train")
    import torchvision.io as tvio

    encoded = [tvio.read_file(p) for p, _ in split.samples]
    got = decode_batch(encoded, 24, torch.device("cpu"))
    for i, (p, _) in enumerate(split.samples):
        ref = torch.from_numpy(load_square(p, 24)).float()
        # JPEG decoders and antialiased resizers differ by round-off, not by geometry
        assert (got[i].float() - ref).abs().mean() < 4.0


# --------------------------------------------------------------------------------------------
# Evaluation, checkpoints
# --------------------------------------------------------------------------------------------


def test_topk_errors_and_ensemble_against_scikit_learn(tmp_path: Path) -> None:
    from sklearn.metrics import top_k_accuracy_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 7, 200)
    runs = []
    for k in range(3):
        p = rng.dirichlet(np.ones(7), 200).astype(np.float32)
        d = tmp_path / f"r{k}"
        d.mkdir()
        np.save(d / "val_probs.npy", p.astype(np.float16))
        np.save(d / "val_labels.npy", y)
        runs.append((d, p.astype(np.float16).astype(np.float64)))
    e = topk_errors(runs[0][1], y)
    assert e["top1_err"] == pytest.approx(
        100 * (1 - top_k_accuracy_score(y, runs[0][1], k=1, labels=range(7)))
    )
    assert e["top5_err"] == pytest.approx(
        100 * (1 - top_k_accuracy_score(y, runs[0][1], k=5, labels=range(7)))
    )
    ens = ensemble([d for d, _ in runs])
    avg = np.mean([p for _, p in runs], 0)
    assert ens["top1_err"] == pytest.approx(100 * (1 - np.mean(avg.argmax(1) == y)))
    assert len(ens["members"]) == 3
    np.save(runs[2][0] / "val_labels.npy", y[::-1].copy())
    with pytest.raises(ConvlensError, match="different validation images"):
        ensemble([d for d, _ in runs])


def test_checkpoint_is_weights_only_and_resume_guards_config(tmp_path: Path) -> None:
    model = build_model(TrainConfig.miniature(width_mult=0.0625), 3)
    opt = make_optimizer(model, TrainConfig(), fused=False)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.1)
    sched.step(0.5)
    path = save_checkpoint(
        tmp_path / "c.pt",
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "rng": {"torch_cpu": [torch.get_rng_state()]},
            "config": TrainConfig().to_dict(),
            "epoch": 1,
            "step": 2,
        },
    )
    raw = torch.load(path, weights_only=True)  # the contract: no pickled objects
    assert raw["epoch"] == 1 and raw["config"]["lr"] == 0.01
    ckpt = load_checkpoint(path)
    sched2 = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.1)
    sched2.load_state_dict(ckpt["scheduler"])
    assert sched2.best == 0.5
    saved = TrainConfig().to_dict()
    assert check_resume(saved, TrainConfig().replace(epochs=90).to_dict()) == ["epochs"]
    with pytest.raises(ConvlensError, match="lr"):
        check_resume(saved, TrainConfig().replace(lr=0.1).to_dict())
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConvlensError, match="not a loadable checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")


def test_report_sets_our_numbers_and_ensembles_beside_the_paper(tmp_path: Path) -> None:
    from convlens_zeiler_fergus.report import build_report

    rng = np.random.default_rng(1)
    y = rng.integers(0, 5, 50)
    probs = {}

    def fake_run(d: Path, name: str, seed: int) -> None:
        d.mkdir(parents=True)
        p = rng.dirichlet(np.ones(5), 50).astype(np.float16)
        probs[str(d)] = p.astype(np.float64)
        np.save(d / "val_probs.npy", p)
        np.save(d / "val_labels.npy", y)
        top1 = float(100 * np.mean(p.argmax(1) != y))
        (d / "eval.json").write_text(
            json.dumps(
                {
                    "experiment": name,
                    "seed": seed,
                    "epochs": 1,
                    "global_step": 3,
                    "val": {"n": 50, "top1_err": top1, "top5_err": 0.0, "crops": 10},
                    "train": {"n": 10, "top1_err": 12.5, "crops": 10},
                }
            )
        )

    members = [tmp_path / "zfnet" / f"member{k}" for k in range(2)]
    for k, d in enumerate(members):
        fake_run(d, "zfnet", k)
    fake_run(tmp_path / "zfnet-wide", "zfnet-wide", 0)
    html = build_report(tmp_path).read_text()
    rep = json.loads((tmp_path / "report" / "report.json").read_text())
    ens = rep["ensembles"]
    avg = np.mean([probs[str(d)] for d in members], 0)
    assert ens["ens:zfnet"]["top1_err"] == pytest.approx(100 * np.mean(avg.argmax(1) != y))
    both = np.mean([probs[str(d)] for d in members + [tmp_path / "zfnet-wide"]], 0)
    assert ens["ens:zfnet+zfnet-wide"]["top1_err"] == pytest.approx(
        100 * np.mean(both.argmax(1) != y)
    )
    row = [r for r in rep["table2"] if r["experiment"] == "ens:zfnet+zfnet-wide"][0]
    assert row["paper"]["test_top5"] == 14.8 and row["ours"]["members"] == 3
    t3 = [r for r in rep["table3"] if r["experiment"] == "zfnet"][0]
    assert t3["ours"]["train_top1"] == 12.5 and t3["paper"]["train_top1"] == 33.1
    assert f"{ens['ens:zfnet']['top1_err']:.2f}" in html and "12.50" in html
