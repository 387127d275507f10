"""The recorder against independent references: plain hooks, hand-computed switches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convlens.engine import record, trace_model
from convlens.errors import LayerNotFoundError, NothingCapturedError
from convlens.testing import tiny_model


def _hooks_clean(model: nn.Module) -> bool:
    return (
        all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
        and torch._C._len_torch_function_stack() == 0
    )


def test_functional_switches_equal_hand_computed():
    model, shape = tiny_model("functional")
    x = torch.randn(shape[0] + 1, *shape[1:], generator=torch.Generator().manual_seed(1))
    with record(model) as rec:
        model(x)
    a = F.relu(model.conv1(x))
    out1, idx1 = F.max_pool2d(a, 3, 2, padding=1, return_indices=True)
    _, idx2 = F.max_pool2d(F.relu(model.conv2(out1)), 2, return_indices=True)
    assert list(rec.switches) == ["/max_pool2d", "/max_pool2d:1"]
    assert torch.equal(rec.switches["/max_pool2d"].indices, idx1)
    assert torch.equal(rec.switches["/max_pool2d:1"].indices, idx2)
    sw = rec.switches["/max_pool2d"]
    assert sw.input_shape == tuple(a.shape) and sw.kernel_size == (3, 3) and sw.padding == (1, 1)
    # functional relus are layers of their own in the trace
    assert [c.name for c in rec.trace if c.kind == "function"][:2] == ["/relu", "/max_pool2d"]


def test_module_pool_switches_and_output_unchanged():
    model, shape = tiny_model("chain")
    x = torch.randn(shape)
    plain = model(x)
    with record(model, ["features.pool1"]) as rec:
        out = model(x)
    assert torch.equal(plain, out)  # recording does not change the result
    relu1 = F.relu(model.features.conv1(x))
    ref_out, ref_idx = F.max_pool2d(relu1, 3, 2, ceil_mode=True, return_indices=True)
    sw = rec.switches["features.pool1"]
    assert sw.ceil_mode and torch.equal(sw.indices, ref_idx)
    assert torch.equal(rec["features.pool1"], ref_out)


def test_inplace_relu_does_not_overwrite_recorded_conv_output():
    model, shape = tiny_model("chain", inplace=True)
    x = torch.randn(shape)
    with record(model, ["features.conv1", "conv1"]) as rec:
        model(x)
    expected = model.features.conv1(x)
    assert (expected < 0).any()
    assert torch.equal(rec["features.conv1"], expected)
    assert torch.equal(rec["conv1"], F.relu(expected))  # alias → rectified map


def test_reused_module_recorded_per_call():
    model, shape = tiny_model("reused")
    x = torch.randn(shape)
    with record(model, ["relu", "pool"]) as rec:
        model(x)
    r0 = F.relu(model.conv1(x))
    p0 = F.max_pool2d(r0, 2)
    r1 = F.relu(model.conv2(p0))
    assert torch.equal(rec["relu"], r0)
    assert torch.equal(rec["relu:1"], r1)
    assert [t.shape for t in rec.calls("pool")] == [p0.shape, F.max_pool2d(r1, 2).shape]
    assert list(rec.switches) == ["pool", "pool:1"]
    with record(model, ["relu:1"]) as only:
        model(x)
    assert list(only.activations) == ["relu:1"]


def test_hooks_removed_after_exception():
    model, shape = tiny_model("chain")
    with pytest.raises(RuntimeError), record(model, ["conv2"]):
        model(torch.randn(1, 3, 2, 2))  # too small: conv fails inside forward
    assert _hooks_clean(model)
    with record(model, ["conv2"]):
        model(torch.randn(shape))
    assert _hooks_clean(model)


def test_unknown_layer_names_the_layer_and_suggests():
    model, _ = tiny_model("chain")
    with pytest.raises(LayerNotFoundError, match=r"'features\.conv9'.*did you mean"):
        with record(model, ["features.conv9"]):
            pass
    assert _hooks_clean(model)


def test_layer_that_never_runs_is_an_error():
    model, shape = tiny_model("chain")
    model.unused = nn.Conv2d(3, 3, 1)
    with pytest.raises(NothingCapturedError, match="unused"), record(model, ["unused"]):
        model(torch.randn(shape))
    with pytest.raises(NothingCapturedError, match="not called"), record(model, ["conv1"]):
        pass


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
def test_timm_models_match_plain_hooks(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(2, 3, 64, 64)
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.BatchNorm2d, nn.Conv2d))]
    layers = layers[:: max(1, len(layers) // 6)]
    plain: dict[str, torch.Tensor] = {}
    handles = [
        dict(model.named_modules())[n].register_forward_hook(
            lambda m, i, o, n=n: plain.__setitem__(n, o.detach().clone())
        )
        for n in layers
    ]
    with torch.no_grad():
        ref = model(x)
    for h in handles:
        h.remove()
    with torch.no_grad(), record(model, layers) as rec:
        out = model(x)
    assert torch.equal(out, ref)
    for n in layers:
        assert torch.equal(rec[n], plain[n]), n
    if name == "resnet18":
        ref_idx = F.max_pool2d(
            F.relu(model.bn1(model.conv1(x))), 3, 2, padding=1, return_indices=True
        )[1]
        assert torch.equal(rec.switches["maxpool"].indices, ref_idx)
        assert any(c.type == "add" for c in rec.trace)  # the residual add is seen
    assert _hooks_clean(model)


def test_bfloat16_recording():
    model, shape = tiny_model("resnet")
    model = model.to(torch.bfloat16)
    x = torch.randn(shape).to(torch.bfloat16)
    with record(model, ["bn", "/add"]) as rec:
        out = model(x)
    assert rec["bn"].dtype == torch.bfloat16 and out.dtype == torch.bfloat16
    assert torch.equal(rec["/add"], rec.layer("/add") and rec["/add"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_recording():
    model, shape = tiny_model("chain")
    model = model.cuda()
    with record(model, ["conv2"]) as rec:
        model(torch.randn(shape, device="cuda"))
    assert rec["conv2"].is_cuda and rec.switches["features.pool1"].indices.is_cuda


def test_new_forward_pass_starts_fresh_record():
    model, shape = tiny_model("chain")
    with record(model, ["conv3"]) as rec:
        model(torch.zeros(shape))
        first = rec["conv3"].clone()
        model(torch.ones(shape))
    assert rec.passes == 2 and not torch.equal(first, rec["conv3"])
    assert len([c for c in rec.trace if c.name == "features.conv1"]) == 1


def test_trace_model_lists_layers_in_order():
    model, _ = tiny_model("chain")
    rec = trace_model(model, torch.zeros(1, 3, 32, 32))
    names = [c.name for c in rec.leaves()]
    assert names[:4] == ["features.conv1", "features.relu1", "features.pool1", "features.norm1"]
    assert names[-1] == "fc"


def test_top_conv_layer_skips_pooling_modules_and_functions():
    from convlens.engine import top_conv_layer

    model, shape = tiny_model("functional")
    assert top_conv_layer(model, trace_model(model, torch.zeros(shape))) == "/relu:1"
    model, shape = tiny_model("reused")
    assert top_conv_layer(model, trace_model(model, torch.zeros(shape))) == "relu:1"
    chain, _ = tiny_model("chain")
    assert top_conv_layer(chain) == "conv3"  # the alias wins where the model defines one


def test_a_recording_is_freed_at_once_not_by_the_cyclic_collector():
    """A long streaming pass (the atlas's pass 1) records batch after batch: each recording and
    its activations must go as soon as it is dropped, not wait for ``gc`` (memory would grow)."""
    import gc
    import weakref

    from convlens.testing import tiny_model

    model, shape = tiny_model("functional")
    layer = next(n for n, m in model.named_modules() if n)
    gc.disable()
    try:
        for kw in ({"functional": True}, {"switches": True, "trace": True}):
            with torch.no_grad(), record(model, [layer], **kw) as rec:
                model(torch.zeros(shape))
            ref = weakref.ref(rec)
            del rec
            assert ref() is None, kw
    finally:
        gc.enable()


def _counting(model: nn.Module) -> list[int]:
    calls = [0]
    model.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_traced_pass_is_one_pass_shared_until_weights_modes_or_image_change():
    """The trace and output of ``traced_pass`` equal a fresh ``record`` pass; a second call with
    the same image runs nothing, and any change of weights, mode or image runs the model again."""
    from convlens.engine import traced_pass

    model, shape = tiny_model("chain")
    model.eval()
    calls = _counting(model)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    rec, out = traced_pass(model, x)
    with torch.no_grad(), record(model, switches=False, trace=True) as ref:
        expected = model(x)
    assert calls[0] == 2 and torch.equal(out, expected)
    assert [(c.name, c.output_shape) for c in rec.trace] == [
        (c.name, c.output_shape) for c in ref.trace
    ]
    assert rec.activations == {}  # the stored pass keeps no activations
    assert traced_pass(model, x.clone())[1] is out and calls[0] == 2  # equal image: stored
    traced_pass(model, x + 1)
    assert calls[0] == 3  # another image
    traced_pass(model, x + 1)
    with torch.no_grad():
        model.features.conv1.weight.mul_(2)  # an in-place weight update
    _, out2 = traced_pass(model, x + 1)
    assert calls[0] == 4 and not torch.equal(out2, out)
    model.train()
    traced_pass(model, x + 1)
    assert calls[0] == 5 and model.training  # another mode; the pass itself ran in eval mode


def test_traced_pass_holds_the_model_weakly():
    import gc
    import weakref

    from convlens.engine import traced_pass

    model, shape = tiny_model("chain")
    traced_pass(model.eval(), torch.zeros(shape))
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
