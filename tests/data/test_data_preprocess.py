"""convlens.data.preprocess: resize -> centre crop -> normalise, checked against hand computations,
torchvision and timm."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convlens.data import (
    DEFAULT_CROP_PCT,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocess,
    SkippedImageWarning,
    load_batch,
    load_image,
    sample,
)
from convlens.errors import ConvlensError, ImageError

# -- a synthetic image whose resize is exact: 2x2 constant blocks, halved with a box filter -------


def _block_image(
    blocks_h: int = 12, blocks_w: int = 20, seed: int = 0
) -> tuple[Image.Image, np.ndarray]:
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (blocks_h, blocks_w, 3), dtype=np.uint8)
    pixels = blocks.repeat(2, axis=0).repeat(2, axis=1)  # (2*bh, 2*bw, 3)
    return Image.fromarray(pixels, "RGB"), blocks


def _hand_normalise(rgb_uint8: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    x = rgb_uint8.astype(np.float64) / 255.0
    x = (x - np.array(mean)) / np.array(std)
    return x.transpose(2, 0, 1)  # HWC -> CHW


def test_defaults_are_imagenet_256_224() -> None:
    p = Preprocess()
    assert p.input_size == (224, 224)
    assert p.resize == 256
    assert p.mean == (0.485, 0.456, 0.406)
    assert p.std == (0.229, 0.224, 0.225)
    assert p.interpolation == "bilinear"


def test_transform_matches_hand_computation() -> None:
    img, blocks = _block_image()  # 40 x 24 pixels (w x h)
    p = Preprocess(input_size=(8, 10), resize=12, interpolation="box")
    # shorter side 24 -> 12, longer 40 -> int(12 * 40 / 24) = 20: exactly the block grid
    assert p.resized_size(40, 24) == (20, 12)
    # crop 8 x 10 from 12 x 20: top = round(4 / 2) = 2, left = round(10 / 2) = 5
    assert p.crop_box(40, 24) == (5, 2, 15, 10)
    x = p(img)
    assert x.shape == (3, 8, 10) and x.dtype == torch.float32
    expected = _hand_normalise(blocks[2:10, 5:15])
    np.testing.assert_allclose(x.numpy(), expected, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(p.resize_crop(img)), blocks[2:10, 5:15])


def test_centre_crop_rounds_halves_like_torchvision() -> None:
    img, blocks = _block_image()
    # (12 - 7) / 2 = 2.5 and (20 - 9) / 2 = 5.5: Python's round() gives 2 and 6
    p = Preprocess(input_size=(7, 9), resize=12, interpolation="nearest")
    assert p.crop_box(40, 24) == (6, 2, 15, 9)
    np.testing.assert_allclose(p(img).numpy(), _hand_normalise(blocks[2:9, 6:15]), atol=1e-6)


def test_portrait_image_resizes_its_width() -> None:
    img, blocks = _block_image(blocks_h=20, blocks_w=12)  # 24 x 40 (w x h)
    p = Preprocess(input_size=(10, 8), resize=12, interpolation="box")
    assert p.resized_size(24, 40) == (12, 20)
    assert p.crop_box(24, 40) == (2, 5, 10, 15)
    np.testing.assert_allclose(p(img).numpy(), _hand_normalise(blocks[5:15, 2:10]), atol=1e-6)


def test_longer_side_is_truncated_like_torchvision() -> None:
    p = Preprocess()
    assert p.resized_size(600, 400) == (384, 256)
    assert p.resized_size(451, 300) == (int(256 * 451 / 300), 256) == (384, 256)
    assert p.resized_size(300, 451) == (256, 384)
    assert p.resized_size(256, 256) == (256, 256)


def test_matches_torchvision_on_a_real_photo() -> None:
    from torchvision import transforms as T

    img = load_image(sample("coffee").path)
    reference = T.Compose(
        [
            T.Resize(256, interpolation=T.InterpolationMode.BILINEAR),
            T.CenterCrop(224),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )(img)
    ours = Preprocess()(img)
    assert ours.shape == (3, 224, 224)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)


def test_non_rgb_input_is_converted_like_load_image() -> None:
    gray = Image.fromarray(np.arange(256 * 256, dtype=np.uint32).reshape(256, 256).astype(np.uint8))
    p = Preprocess()
    torch.testing.assert_close(p(gray), p(gray.convert("RGB")))
    with pytest.raises(ConvlensError, match="expected a PIL image"):
        p(np.zeros((4, 4, 3), dtype=np.uint8))  # type: ignore[arg-type]


def test_denormalize_inverts_and_clamps() -> None:
    img, _ = _block_image()
    p = Preprocess(input_size=(8, 10), resize=12, interpolation="box")
    x01 = p.to_tensor01(img)
    assert float(x01.min()) >= 0.0 and float(x01.max()) <= 1.0
    torch.testing.assert_close(p.denormalize(p(img)), x01, atol=1e-6, rtol=0)
    batch = torch.stack([p(img), p(img)])
    assert p.denormalize(batch).shape == (2, 3, 8, 10)
    torch.testing.assert_close(p.normalize(x01), p(img))
    extreme = torch.full((3, 2, 2), 100.0)
    extreme[0] = -100.0
    out = p.denormalize(extreme)
    assert float(out[0].max()) == 0.0 and float(out[1:].min()) == 1.0
    with pytest.raises(ConvlensError, match=r"\[3, H, W\]"):
        p.denormalize(torch.zeros(4, 8, 8))


def test_to_model_space() -> None:
    p = Preprocess()
    grey = p.to_model_space(0.5)
    expected = tuple((0.5 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True))
    assert grey == pytest.approx(expected)
    assert p.to_model_space(p.mean) == pytest.approx((0.0, 0.0, 0.0))
    assert p.to_model_space((0.0, 1.0, 0.5)) == pytest.approx(
        ((0 - 0.485) / 0.229, (1 - 0.456) / 0.224, (0.5 - 0.406) / 0.225)
    )
    # a uniform image of that colour lands on exactly that value everywhere
    value = 51  # 51 / 255 = 0.2
    uniform = Image.new("RGB", (300, 260), (value, value, value))
    x = p(uniform)
    for c, v in enumerate(p.to_model_space(value / 255)):
        torch.testing.assert_close(x[c], torch.full((224, 224), v), atol=1e-6, rtol=0)
    with pytest.raises(ConvlensError, match=r"\[0, 1\]"):
        p.to_model_space(128)
    with pytest.raises(ConvlensError, match="3 "):
        p.to_model_space((0.5, 0.5))


def test_batch() -> None:
    img, _ = _block_image()
    p = Preprocess(input_size=(8, 10), resize=12, interpolation="box")
    out = p.batch([img, img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
    assert out.shape == (2, 3, 8, 10)
    torch.testing.assert_close(out[0], p(img))
    assert not torch.equal(out[0], out[1])
    with pytest.raises(ConvlensError, match="no images"):
        p.batch([])


def test_to_dict_round_trip_and_unknown_keys() -> None:
    p = Preprocess(input_size=(200, 180), resize=230, mean=(0.5, 0.5, 0.5), interpolation="bicubic")
    d = p.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d == {
        "input_size": [200, 180],
        "resize": 230,
        "mean": [0.5, 0.5, 0.5],
        "std": list(IMAGENET_STD),
        "interpolation": "bicubic",
    }
    assert Preprocess.from_dict(json.loads(json.dumps(d))) == p
    with pytest.raises(ConvlensError, match="unknown key.*crop_pct"):
        Preprocess.from_dict({**d, "crop_pct": 0.9})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"resize": 200}, "smaller than the 224x224 crop"),
        ({"interpolation": "cubic"}, "choose from nearest, bilinear"),
        ({"std": (0.2, 0.0, 0.2)}, "positive"),
        ({"mean": (0.5, 0.5)}, "3 finite numbers"),
        ({"input_size": (224,)}, "height, width"),
        ({"input_size": (0, 224)}, "height, width"),
        ({"resize": 256.0}, "expected an int"),
    ],
)
def test_invalid_settings(kwargs: dict, match: str) -> None:
    with pytest.raises(ConvlensError, match=match):
        Preprocess(**kwargs)


def test_mean_std_lists_are_coerced_to_tuples() -> None:
    p = Preprocess(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])  # type: ignore[arg-type]
    assert p.mean == (0.5, 0.5, 0.5) and isinstance(p.std, tuple)
    hash(p)  # frozen and hashable


# -- for_model ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FakeInfo:
    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, float, float] = (0.5, 0.4, 0.3)
    std: tuple[float, float, float] = (0.2, 0.25, 0.3)
    interpolation: str = "bicubic"
    crop_pct: float | None = 0.95


class FakeModel(torch.nn.Module):
    def __init__(self, info: object) -> None:
        super().__init__()
        self.convlens_info = info


def test_for_model_reads_convlens_info_with_timm_resize_rule() -> None:
    p = Preprocess.for_model(FakeModel(FakeInfo()))
    # timm: scale_size = floor(224 / 0.95) = floor(235.79) = 235 (round() would give 236)
    assert p.resize == 235 == math.floor(224 / 0.95)
    assert p.input_size == (224, 224)
    assert p.mean == (0.5, 0.4, 0.3) and p.std == (0.2, 0.25, 0.3)
    assert p.interpolation == "bicubic"


@pytest.mark.parametrize(
    ("size", "crop_pct", "resize"),
    [(227, 0.875, 259), (224, None, 256), (224, 1.0, 224), (231, 0.8, 288)],
)
def test_for_model_resize_from_crop_pct(size: int, crop_pct: float | None, resize: int) -> None:
    info = FakeInfo(input_size=(3, size, size), crop_pct=crop_pct)
    p = Preprocess.for_model(FakeModel(info))
    assert p.resize == resize == math.floor(size / (crop_pct or DEFAULT_CROP_PCT))
    assert p.input_size == (size, size)


def test_for_model_bad_info() -> None:
    @dataclass
    class Partial:
        input_size: tuple[int, int, int] = (3, 224, 224)
        mean: tuple[float, ...] = IMAGENET_MEAN

    with pytest.raises(ConvlensError, match=r"^FakeModel\.convlens_info: missing field\(s\) std"):
        Preprocess.for_model(FakeModel(Partial()))
    with pytest.raises(ConvlensError, match="^FakeModel: input_size .* only RGB"):
        Preprocess.for_model(FakeModel(FakeInfo(input_size=(1, 28, 28))))
    with pytest.raises(ConvlensError, match="^FakeModel: crop_pct"):
        Preprocess.for_model(FakeModel(FakeInfo(crop_pct=1.5)))
    with pytest.raises(ConvlensError, match="^FakeModel: Preprocess interpolation 'random'"):
        Preprocess.for_model(FakeModel(FakeInfo(interpolation="random")))


def test_for_model_warns_on_unsupported_crop_mode() -> None:
    @dataclass(frozen=True)
    class Squash(FakeInfo):
        crop_mode: str = "squash"

    with pytest.warns(UserWarning, match="crop_mode 'squash' is not supported"):
        p = Preprocess.for_model(FakeModel(Squash()))
    assert p.input_size == (224, 224)


def test_for_model_plain_module_gets_the_default() -> None:
    assert Preprocess.for_model(torch.nn.Conv2d(3, 4, 3)) == Preprocess()


def test_for_model_timm_matches_timm_eval_transform() -> None:
    timm = pytest.importorskip("timm")
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model("resnet18", pretrained=False)
    p = Preprocess.for_model(model)
    # resnet18's default config (a1_in1k): 224 input, crop_pct 0.95, bicubic, ImageNet mean/std
    assert p == Preprocess(
        input_size=(224, 224),
        resize=235,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        interpolation="bicubic",
    )
    reference = create_transform(**resolve_data_config({}, model=model))
    img = load_image(sample("chelsea").path)
    torch.testing.assert_close(p(img), reference(img), atol=1e-6, rtol=0)


# -- load_batch -----------------------------------------------------------------------------------


def test_load_batch(tmp_path: Path) -> None:
    (tmp_path / "inner").mkdir()
    img, _ = _block_image()
    img.save(tmp_path / "b.png")
    img.transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(tmp_path / "inner" / "a.png")
    (tmp_path / "notes.txt").write_text("x")
    p = Preprocess(input_size=(8, 10), resize=12, interpolation="box")
    with pytest.warns(SkippedImageWarning, match="notes.txt"):
        x, paths = load_batch(tmp_path, p)
    assert paths == [tmp_path / "b.png", tmp_path / "inner" / "a.png"]
    assert x.shape == (2, 3, 8, 10)
    torch.testing.assert_close(x[0], p(img))

    x, paths = load_batch([tmp_path / "b.png"])  # default preprocessing
    assert x.shape == (1, 3, 224, 224) and paths == [tmp_path / "b.png"]
    with pytest.raises(ImageError, match="notes.txt: not an image"):
        load_batch(tmp_path / "notes.txt", p)


def test_a_tiny_image_enlarged_past_the_documented_factor_warns_once_per_call():
    import warnings

    from PIL import Image

    from convlens.data import MAX_UPSCALE, Preprocess, UpscaleWarning

    pre = Preprocess(input_size=(224, 224), resize=256)
    with pytest.warns(UpscaleWarning, match=r"1x1 px enlarged 256x"):
        pre(Image.new("RGB", (1, 1), (10, 20, 30)))
    side = int(256 / MAX_UPSCALE)  # exactly the factor: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", UpscaleWarning)
        pre(Image.new("RGB", (side, side)))
        pre(Image.new("RGB", (300, 200)))
