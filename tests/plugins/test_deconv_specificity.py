"""image_specificity and the ``auto`` rule: the deconvnet is image-independent exactly where no
max-pooling switches lie below a layer (checked by recomputing cosines by hand), ``auto`` keeps
the paper's rule on zfnet, alexnet and vgg16 and switches to guided on efficientnet_lite0."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from convlens_deconv import Seed, project
from convlens_deconv._specificity import (
    SPECIFICITY_THRESHOLD,
    _units,
    choose_rule,
    image_specificity,
)
from torch import nn

from convlens.data import Preprocess, default_images, load_batch
from convlens.testing import tiny_model


def quiet(name: str, **kwargs) -> nn.Module:
    from convlens.models import create_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_model(name, **kwargs).eval()


def photos(model: nn.Module, n: int = 3, size: int | None = None) -> torch.Tensor:
    x, _ = load_batch(default_images()[:n], Preprocess.for_model(model))
    if size is not None:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x


def test_figure_is_the_mean_pairwise_cosine_recomputed_by_hand():
    model, shape = tiny_model("chain", lrn=False)
    x = torch.randn(3, *shape[1:], generator=torch.Generator().manual_seed(5))
    fig, pairs, units = image_specificity(model, x, "conv3", "guided", units=2)
    seeds = [Seed(i, c, y, xx) for c, y, xx in units for i in range(3)]
    p = project(model, x, "conv3", seeds, rule="guided", start="one").projections
    p = p.reshape(len(units), 3, -1).double()
    sims = []
    for u in range(len(units)):
        for i in range(3):
            for j in range(i + 1, 3):
                a, b = p[u, i], p[u, j]
                if a.norm() > 0 and b.norm() > 0:
                    sims.append(float(a @ b / (a.norm() * b.norm())))
    assert pairs == len(sims) > 0
    assert fig == pytest.approx(sum(sims) / len(sims), abs=1e-9)


def test_units_fire_in_every_image():
    act = torch.zeros(3, 4, 2, 2)
    act[:, 2, 1, 0] = torch.tensor([5.0, 4.0, 3.0])  # fires everywhere: chosen first
    act[0, 1, 0, 0] = 9.0  # strongest single value, but silent in two images
    assert _units(act, 1) == [(2, 1, 0)]


def test_deconvnet_is_image_independent_without_switches_and_guided_is_not():
    model = quiet("efficientnet_lite0")
    x = photos(model, 3, 96)
    fd, pd, _ = image_specificity(model, x, "blocks.3", "deconvnet")
    fg, pg, _ = image_specificity(model, x, "blocks.3", "guided")
    assert pd > 0 and pg > 0
    assert fd == pytest.approx(1.0, abs=1e-6)  # no max pooling in EfficientNet
    assert fg < 0.5


def test_auto_picks_guided_on_efficientnet_lite0_and_says_why():
    model = quiet("efficientnet_lite0")
    x = photos(model, 3, 96)
    choice = choose_rule(model, x, "blocks.5")
    assert choice.rule == "guided"
    assert choice.figures["deconvnet"] > SPECIFICITY_THRESHOLD
    assert choice.figure < 0.5 and choice.warning is None
    assert "no max-pooling switches" in choice.reason
    d = choice.to_dict()
    assert d["image_specificity"] == choice.figure and d["rule"] == "guided"


@pytest.mark.parametrize(
    "name,layer,size,kwargs",
    [
        ("zfnet", "conv5", 112, {"width_mult": 0.25, "input_size": 112}),
        ("alexnet", "conv5", 112, {"width_mult": 0.25, "input_size": 112}),
        ("vgg16", "features.29", 64, {}),
    ],
)
def test_auto_keeps_the_paper_deconvnet_where_switches_make_it_image_specific(
    name, layer, size, kwargs
):
    model = quiet(name, **kwargs)
    x = photos(model, 3, size)
    choice = choose_rule(model, x, layer)
    assert choice.rule == "deconvnet", choice.reason
    assert choice.figure < SPECIFICITY_THRESHOLD
    assert "guided" not in choice.figures  # never needed to look further


def test_a_first_layer_unit_is_the_filter_under_every_rule_and_the_paper_rule_is_kept():
    model = quiet("zfnet", width_mult=0.25, input_size=112)
    x = photos(model, 3, 112)
    choice = choose_rule(model, x, "conv1")
    assert choice.figures["deconvnet"] == pytest.approx(1.0, abs=1e-6)
    assert choice.rule == "deconvnet" and "no rule is image-specific" in choice.reason
    assert choice.warning is not None and "conv1" in choice.warning


def test_requested_rule_is_kept_and_measured():
    model = quiet("efficientnet_lite0")
    x = photos(model, 2, 64)
    choice = choose_rule(model, x, "blocks.2", "deconvnet")
    assert choice.rule == "deconvnet" and choice.reason == "requested"
    assert choice.figure == pytest.approx(1.0, abs=1e-6) and choice.warning is not None


def test_the_choice_is_kept_on_disk_and_measured_again_when_anything_changes(tmp_path, monkeypatch):
    import convlens_deconv._specificity as spec
    from convlens_deconv._rule_cache import rule_key

    monkeypatch.setenv("CONVLENS_CACHE", str(tmp_path))
    model, shape = tiny_model("chain")
    x = torch.randn(3, *shape[1:], generator=torch.Generator().manual_seed(0))
    layer = "features.conv3"
    calls = []
    measure = spec._choose_rule

    def counted(*args, **kwargs):
        calls.append(args[2])
        return measure(*args, **kwargs)

    monkeypatch.setattr(spec, "_choose_rule", counted)
    first = choose_rule(model, x, layer, precision="fp32")
    files = list((tmp_path / "rules").glob("*.json"))
    assert len(calls) == 1 and len(files) == 1
    assert files[0].stat().st_mode & 0o777 == 0o644
    again = choose_rule(model, x, layer, precision="fp32")  # read back, not measured
    assert len(calls) == 1 and again == first
    choose_rule(model, x, layer, cache=False, precision="fp32")  # asked not to look
    assert len(calls) == 2
    # other images, other weights: another key, measured again
    key = rule_key(model, x, layer, "auto", 3, "paper", "auto")
    assert rule_key(model, x, layer, "auto", 3, "paper", "auto", "bf16") != key
    assert rule_key(model, x.flip(-1), layer, "auto", 3, "paper", "auto") != key
    with torch.no_grad():
        next(model.parameters()).view(-1)[5] += 1e-3
    assert rule_key(model, x, layer, "auto", 3, "paper", "auto") != key
    choose_rule(model, x, layer, precision="fp32")
    assert len(calls) == 3
    # a damaged file is measured again, not trusted
    for f in (tmp_path / "rules").glob("*.json"):
        f.write_text("{not json", encoding="utf-8")
    assert choose_rule(model, x, layer, precision="fp32").rule in ("deconvnet", "guided")
    assert len(calls) == 4


def test_the_measurement_in_bf16_gives_the_fp32_choice_and_says_so(monkeypatch):
    import convlens.engine.precision as core

    model = quiet("efficientnet_lite0")
    x = photos(model, 3, 96)
    monkeypatch.setattr(core, "native_bf16", lambda device: True)
    low = choose_rule(model, x, "blocks.5", cache=False)
    full = choose_rule(model, x, "blocks.5", cache=False, precision="fp32")
    assert (low.precision, full.precision) == ("bf16", "fp32")
    assert low.rule == full.rule == "guided" and low.units == full.units
    for rule, f in full.figures.items():
        assert low.figures[rule] == pytest.approx(f, abs=0.05)
    assert low.to_dict()["precision"] == "bf16"
    assert next(model.parameters()).dtype == torch.float32  # a copy was measured
    monkeypatch.setattr(core, "native_bf16", lambda device: False)
    assert choose_rule(model, x, "blocks.5", cache=False).precision == "fp32"


def test_a_model_whose_ops_lack_bf16_is_measured_in_fp32():
    model, shape = tiny_model("chain")  # local response normalisation: no bf16 CPU kernel
    x = torch.randn(3, *shape[1:], generator=torch.Generator().manual_seed(0))
    low = choose_rule(model, x, "features.conv3", cache=False, precision="bf16")
    full = choose_rule(model, x, "features.conv3", cache=False, precision="fp32")
    assert low.precision == "fp32" and low.figures == full.figures


def test_a_bad_precision_is_a_convlens_error():
    from convlens.errors import ConvlensError

    model, shape = tiny_model("chain")
    x = torch.randn(2, *shape[1:])
    with pytest.raises(ConvlensError, match="precision 'fp8'"):
        choose_rule(model, x, "features.conv3", cache=False, precision="fp8")


def _count_passes(model: nn.Module) -> list[int]:
    calls = [0]
    model.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_one_forward_pass_serves_the_units_the_plan_and_the_deconvnet_projections(monkeypatch):
    """``choose_rule`` records the layer once (units, switches, the plan's trace) and its deconvnet
    projections read that recording: the same figure and projections as separate passes."""
    from convlens_deconv import _project
    from convlens_deconv._project import forward_for_chain

    model, shape = tiny_model("chain", lrn=False)
    x = torch.randn(3, *shape[1:], generator=torch.Generator().manual_seed(2))
    calls = _count_passes(model)
    choice = choose_rule(model, x, "conv3", cache=False, precision="fp32")
    assert calls[0] == 1  # one pass for the whole measurement
    fig, pairs, units = image_specificity(model, x, "conv3", "deconvnet")
    assert calls[0] == 1 + 2  # separately: the units' pass, then project's own
    assert choice.rule == "deconvnet" and choice.figures["deconvnet"] == fig
    assert [tuple(u) for u in choice.units] == units
    seeds = [Seed(i, c, y, xx) for c, y, xx in units for i in range(3)]
    rec = forward_for_chain(model, x, "conv3")
    shared = project(model, x, "conv3", seeds, start="one", recording=rec).projections
    # the old route, for reference: a traced pass of one image, then a pass of all three
    monkeypatch.setattr(_project, "SHARED_PASS_IMAGES", 0)
    own = project(model, x, "conv3", seeds, start="one").projections
    assert torch.equal(shared, own) and own.abs().sum() > 0
    # a recording of other images is not read (its batch does not match)
    other = forward_for_chain(model, x[:2], "conv3")
    mixed = project(model, x, "conv3", seeds, start="one", recording=other).projections
    assert torch.equal(mixed, own)


def test_project_traces_one_image_when_many_are_given(monkeypatch):
    """Above ``SHARED_PASS_IMAGES`` images the plan comes from a traced pass of one image (a
    fallback to the general form must not waste a pass of them all); same projections."""
    from convlens_deconv import _project

    model, shape = tiny_model("chain", lrn=False)
    x = torch.randn(3, *shape[1:], generator=torch.Generator().manual_seed(6))
    seeds = [Seed(i, 1, 1, 1) for i in range(3)]
    calls = _count_passes(model)
    few = project(model, x, "conv3", seeds).projections
    assert calls[0] == 1
    monkeypatch.setattr(_project, "SHARED_PASS_IMAGES", 2)
    many = project(model, x, "conv3", seeds).projections
    assert calls[0] == 1 + 2 and torch.equal(few, many)


def test_the_bf16_copy_for_the_rule_casts_only_what_runs_up_to_the_layer():
    import convlens.engine.precision as core

    model = quiet("vgg11")
    low = core.low_precision_copy(model, torch.bfloat16, through="features.15")
    assert low.features[13].weight.dtype == torch.bfloat16
    assert low.pre_logits.fc1.weight is model.pre_logits.fc1.weight  # shared, not copied
    assert low.head.fc.weight.dtype == torch.float32
    assert core.low_precision_copy(model, torch.bfloat16, through="features.15") is low
    whole = core.low_precision_copy(model, torch.bfloat16)
    assert whole is not low and whole.head.fc.weight.dtype == torch.bfloat16
    x = torch.randn(1, 3, 64, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError):  # past the layer the copy fails loudly, never silently
        low(x)
    with pytest.raises(Exception, match="no module 'nope'"):
        core.low_precision_copy(model, torch.bfloat16, through="nope")
