"""The tail of the network (the layers that run in full for every position) batched across
groups of positions and images, and convolutions that are matrix products run as one
(``_Tail``, ``IncrementalOcclusion.tail_start`` / ``_as_linear``; issue #16): the maps still
equal an independent naive loop (copy the image, paint the square, forward, read the outputs)."""

from __future__ import annotations

import pytest
import torch
from convlens_occlusion import OcclusionGrid, occlusion_maps
from torch import nn

from convlens import record

TOL = 1e-5


class FCConvNet(nn.Module):
    """VGG's shape in small: convolutions and max pooling, then its first fully connected layer
    written as a convolution whose kernel covers the map (timm's ``ConvMlp``), a 1x1
    convolution, and a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.p1 = nn.MaxPool2d(2)
        self.c2 = nn.Conv2d(6, 8, 3, padding=1)
        self.p2 = nn.MaxPool2d(2)
        self.fc6 = nn.Conv2d(8, 16, 6)  # the 6x6 map -> 1x1
        self.fc7 = nn.Conv2d(16, 12, 1)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        x = self.p2(torch.relu(self.c2(self.p1(torch.relu(self.c1(x))))))
        x = torch.relu(self.fc7(torch.relu(self.fc6(x))))
        return self.head(torch.flatten(x, 1))


class EarlyBatchNet(nn.Module):
    """Reads the batch size at the top of ``forward`` and uses it at the end: a value that
    would cross the tail's split is not a batch of rows, so there must be no split."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 5, 3, padding=1)
        self.c2 = nn.Conv2d(5, 6, 3, stride=2, padding=1)
        self.fc = nn.Linear(6 * 6 * 6, 4)

    def forward(self, x):
        n = x.shape[0]
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(x.reshape(n, -1))


def _seeded(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / max(1, p[0].numel()) ** 0.5)
    return model.eval()


def naive(model, x, grid: OcclusionGrid, layer: str, channel: int):
    logits, feats = [], []
    with torch.no_grad():
        for x0, y0, x1, y1 in grid.boxes():
            occluded = x.clone()
            occluded[:, :, y0:y1, x0:x1] = 0.0
            with record(model, [layer], switches=False, trace=False) as r:
                logits.append(model(occluded)[0].double())
            feats.append(r[layer][0, channel].double().sum())
    return torch.stack(logits), torch.stack(feats)


def _rel(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _check(model, x, res, layer):
    rows, cols = res.grid.shape
    for i in range(x.shape[0]):
        logits, feats = naive(model, x[i : i + 1], res.grid, layer, int(res.channels[i]))
        assert _rel(torch.as_tensor(res.logits[i]).reshape(rows * cols, -1), logits) <= TOL
        assert _rel(res.feature_activity[i].reshape(-1), feats) <= TOL


def _x(n, h=24, w=24, seed=1):
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_tail_runs_fully_connected_layers_once_for_all_groups_and_images():
    model, x = _seeded(FCConvNet()), _x(2)
    res = occlusion_maps(model, x, window=6, stride=3, fill=0.0, layer="c2",
                         method="incremental", return_logits=True)  # fmt: skip
    tail = res.path["tail"]
    assert tail is not None and tail["from_node"] == "fc6", res.path["tail"]
    positions = 2 * len(res.grid)
    assert tail["runs"] == -(-positions // tail["batch"])  # every row of both images, batched
    ops = {r["node"]: r["op"] for r in res.path["layers"]}
    # kernel = the whole map, 1x1 output: matrix products; the patch convolutions are not
    assert ops["fc6"] == ops["fc7"] == "run_linear" and ops["c2"] == "local", ops
    _check(model, x, res, "c2")


def test_probed_layer_inside_the_tail_reads_each_images_channel():
    model, x = _seeded(FCConvNet()), _x(2, seed=3)
    res = occlusion_maps(model, x, window=6, stride=3, fill=0.0, layer="fc7", channel=[2, 7],
                         method="incremental", return_logits=True)  # fmt: skip
    assert res.path["tail"] is not None
    assert res.channels.tolist() == [2, 7]
    _check(model, x, res, "fc7")


def test_small_tail_batches_flush_across_images(monkeypatch):
    import convlens_occlusion._compute as compute

    monkeypatch.setattr(compute, "TENSOR_BYTES", 1)  # capacity falls to MIN_BATCH rows
    model, x = _seeded(FCConvNet()), _x(3, seed=4)
    res = occlusion_maps(model, x, window=6, stride=3, fill=0.0, layer="c2",
                         method="incremental", return_logits=True)  # fmt: skip
    tail = res.path["tail"]
    assert tail["batch"] == compute.MIN_BATCH
    rows = 3 * len(res.grid)  # a run starts once a batch fills it: capacity to 2x capacity rows
    assert -(-rows // (2 * compute.MIN_BATCH)) <= tail["runs"] <= -(-rows // compute.MIN_BATCH)
    _check(model, x, res, "c2")


def test_a_batch_size_read_before_the_split_disables_the_tail():
    model, x = _seeded(EarlyBatchNet()), _x(2, 12, 12)
    res = occlusion_maps(model, x, window=4, stride=2, fill=0.0, layer="c2",
                         method="incremental", return_logits=True)  # fmt: skip
    assert res.path["tail"] is None
    assert any(r["mode"] == "patch" for r in res.path["layers"])
    _check(model, x, res, "c2")


@pytest.mark.parametrize("padding", [1, 0])
def test_only_a_convolution_covering_its_unpadded_input_becomes_a_matrix_product(padding):
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
            self.fc = nn.Conv2d(4, 6, 6 if padding == 0 else 8, padding=padding)
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            return self.head(torch.flatten(self.fc(torch.relu(self.c1(x))), 1))

    model, x = _seeded(Net()), _x(1, 12, 12)
    res = occlusion_maps(model, x, window=4, stride=4, fill=0.0, layer="c1",
                         method="incremental", return_logits=True, full_above=0.5)  # fmt: skip
    ops = {r["node"]: r["op"] for r in res.path["layers"]}
    assert (ops["fc"] == "run_linear") == (padding == 0), ops
    _check(model, x, res, "c1")


def test_strongest_unit_of_panel_c_is_read_off_the_unoccluded_pass():
    model, x = _seeded(FCConvNet()), _x(3, seed=5)
    res = occlusion_maps(model, x, window=6, stride=6, fill=0.0, layer="c2")
    with torch.no_grad(), record(model, ["c2"], switches=False, trace=False) as r:
        model(x)
    act = r["c2"]
    for i, c in enumerate(res.channels.tolist()):
        assert c == int(act[i].flatten(1).amax(1).argmax())
        y, x0 = divmod(int(act[i, c].reshape(-1).argmax()), act.shape[-1])
        assert res.strongest_at[i].tolist() == [y, x0]


class ShapeTestedMlp(nn.Module):
    """timm's ``ConvMlp`` in small: a shape test (untraceable by torch.fx, so the module stays
    opaque) before a convolution whose kernel covers its input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(8, 16, 6)
        self.fc2 = nn.Conv2d(16, 12, 1)

    def forward(self, x):
        if x.shape[-1] < 6:
            x = torch.nn.functional.adaptive_avg_pool2d(x, 6)
        return self.fc2(torch.relu(self.fc1(x)))


class OpaqueHeadNet(FCConvNet):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = ShapeTestedMlp()

    def forward(self, x):
        x = self.p2(torch.relu(self.c2(self.p1(torch.relu(self.c1(x))))))
        return self.head(torch.flatten(torch.relu(self.mlp(x)), 1))


def test_convolutions_covering_their_input_inside_an_opaque_module_are_matrix_products(
    monkeypatch,
):
    import convlens_occlusion._incremental as inc

    calls = []
    real = inc._Linear.__call__

    def counted(self, x):
        calls.append(tuple(x.shape))
        return real(self, x)

    monkeypatch.setattr(inc._Linear, "__call__", counted)
    model, x = _seeded(OpaqueHeadNet()), _x(2, seed=6)
    res = occlusion_maps(model, x, window=6, stride=3, fill=0.0, layer="c2",
                         method="incremental", return_logits=True)  # fmt: skip
    assert res.path["opaque_modules"] == ["mlp"]
    assert res.path["tail"] is not None
    # fc1 (6x6 kernel on the 6x6 map) and fc2 (1x1 on 1x1), in the unoccluded passes and the tail
    assert {s[1:] for s in calls} == {(8, 6, 6), (16, 1, 1)}
    assert sum(s[0] for s in calls if s[1:] == (8, 6, 6)) == 2 * len(res.grid) + 2
    _check(model, x, res, "c2")
