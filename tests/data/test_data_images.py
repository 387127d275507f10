"""convlens.data.images: one file in any format -> upright 8-bit RGB, or one clear ImageError."""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import convlens.data as data
from convlens.data import (
    ALPHA_BACKGROUND,
    SkippedImageWarning,
    find_images,
    iter_images,
    load_image,
    load_images,
)
from convlens.data import images as images_mod
from convlens.errors import ConvlensError, ImageError

RED = (220, 30, 40)
BLUE = (20, 40, 210)


# -- helpers -------------------------------------------------------------------------------------


def _png_chunk(tag: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + tag
        + payload
        + struct.pack(">I", zlib.crc32(tag + payload) & 0xFFFFFFFF)
    )


def _write_png(
    path: Path, width: int, height: int, bit_depth: int, color_type: int, idat: bytes
) -> Path:
    """A PNG written by hand, so that header and pixel data can disagree on purpose."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )
    return path


def _rgb(img: Image.Image, xy: tuple[int, int]) -> tuple[int, int, int]:
    return tuple(int(v) for v in img.getpixel(xy))  # type: ignore[return-value]


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def _assert_rgb8(img: Image.Image, size: tuple[int, int]) -> None:
    assert isinstance(img, Image.Image)
    assert img.mode == "RGB"
    assert img.size == size
    assert np.asarray(img).dtype == np.uint8


def _message_of(excinfo: pytest.ExceptionInfo[ImageError]) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# -- formats ---------------------------------------------------------------------------------------


def test_public_surface_is_importable() -> None:
    for name in data.__all__:
        assert hasattr(data, name), name
    assert issubclass(ImageError, ConvlensError)
    assert issubclass(SkippedImageWarning, UserWarning)


def test_png_rgb_is_exact(tmp_path: Path) -> None:
    src = _noise(13, 7)
    src.save(tmp_path / "x.png")
    img = load_image(tmp_path / "x.png")
    _assert_rgb8(img, (13, 7))
    np.testing.assert_array_equal(np.asarray(img), np.asarray(src))


def test_accepts_str_paths(tmp_path: Path) -> None:
    Image.new("RGB", (4, 3), RED).save(tmp_path / "x.png")
    assert _rgb(load_image(str(tmp_path / "x.png")), (0, 0)) == RED


@pytest.mark.parametrize(
    ("suffix", "kwargs", "tol"),
    [
        ("jpg", {"quality": 95}, 6),
        ("webp", {"lossless": True}, 0),
        ("webp", {"quality": 90}, 10),
        ("bmp", {}, 0),
        ("tiff", {}, 0),
    ],
)
def test_common_formats_decode_to_rgb(tmp_path: Path, suffix: str, kwargs: dict, tol: int) -> None:
    path = tmp_path / f"img.{suffix}"
    src = Image.new("RGB", (32, 16), RED)
    src.paste(BLUE, (16, 0, 32, 16))
    src.save(path, **kwargs)
    img = load_image(path)
    _assert_rgb8(img, (32, 16))
    assert np.abs(np.subtract(_rgb(img, (4, 8)), RED)).max() <= tol
    assert np.abs(np.subtract(_rgb(img, (28, 8)), BLUE)).max() <= tol


def test_gif_gives_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (10, 10), RED), Image.new("RGB", (10, 10), BLUE)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(path) as check:
        assert check.n_frames == 2
    img = load_image(path)
    _assert_rgb8(img, (10, 10))
    assert np.abs(np.subtract(_rgb(img, (5, 5)), RED)).max() <= 8  # palette quantisation


def test_grayscale_l_and_1_become_gray_rgb(tmp_path: Path) -> None:
    gray = np.array([[0, 100], [200, 255]], dtype=np.uint8)
    Image.fromarray(gray, "L").save(tmp_path / "l.png")
    out = np.asarray(load_image(tmp_path / "l.png"))
    assert out.shape == (2, 2, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)

    Image.fromarray(gray > 150).save(tmp_path / "bw.png")  # mode "1"
    with Image.open(tmp_path / "bw.png") as check:
        assert check.mode == "1"
    out = np.asarray(load_image(tmp_path / "bw.png"))
    np.testing.assert_array_equal(out[..., 0], np.where(gray > 150, 255, 0))


def test_16bit_grayscale_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257, 1000, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as check:
        assert check.mode.startswith("I")  # really stored as 16 bit
    out = np.asarray(load_image(tmp_path / "g16.png"))
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 4, 128, 255])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_16bit_rgb_png_is_scaled(tmp_path: Path) -> None:
    # PIL cannot write 16-bit RGB, so the file is written by hand: one row of three pixels
    pixels = [(65535, 32768, 0), (257 * 10, 257 * 200, 65535), (0, 0, 0)]
    row = b"\x00" + b"".join(struct.pack(">HHH", *p) for p in pixels)
    path = _write_png(tmp_path / "rgb16.png", 3, 1, 16, 2, zlib.compress(row))
    img = load_image(path)
    _assert_rgb8(img, (3, 1))
    assert [_rgb(img, (x, 0)) for x in range(3)] == [(255, 128, 0), (10, 200, 255), (0, 0, 0)]


def test_32bit_int_and_float_tiffs(tmp_path: Path) -> None:
    ints = np.array([[-5, 0, 32768, 65535, 70000]], dtype=np.int32)
    Image.fromarray(ints, "I").save(tmp_path / "i32.tiff")
    out = np.asarray(load_image(tmp_path / "i32.tiff"))
    np.testing.assert_array_equal(out[0, :, 1], [0, 0, 128, 255, 255])

    unit = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    Image.fromarray(unit, "F").save(tmp_path / "unit.tiff")
    np.testing.assert_array_equal(
        np.asarray(load_image(tmp_path / "unit.tiff"))[0, :, 0], [0, 128, 255]
    )

    wide = np.array([[-3.0, 2.0, 100.4, 300.0]], dtype=np.float32)  # not in [0, 1]: 0..255 units
    Image.fromarray(wide, "F").save(tmp_path / "wide.tiff")
    np.testing.assert_array_equal(
        np.asarray(load_image(tmp_path / "wide.tiff"))[0, :, 0], [0, 2, 100, 255]
    )


def test_rgba_is_composited_over_mid_grey(tmp_path: Path) -> None:
    rgba = np.zeros((1, 3, 4), dtype=np.uint8)
    rgba[0, 0] = (*RED, 255)  # opaque
    rgba[0, 1] = (*RED, 0)  # fully transparent
    rgba[0, 2] = (255, 255, 255, 128)  # half-transparent white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    _assert_rgb8(img, (3, 1))
    assert ALPHA_BACKGROUND == (128, 128, 128)
    assert _rgb(img, (0, 0)) == RED
    assert _rgb(img, (1, 0)) == (128, 128, 128)
    assert all(abs(v - 192) <= 1 for v in _rgb(img, (2, 0)))  # (255 + 128) / 2


def test_la_is_composited_over_mid_grey(tmp_path: Path) -> None:
    la = np.array([[[10, 255], [250, 0]]], dtype=np.uint8)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    img = load_image(tmp_path / "la.png")
    assert [_rgb(img, (x, 0)) for x in range(2)] == [(10, 10, 10), (128, 128, 128)]


def test_palette_with_and_without_transparency(tmp_path: Path) -> None:
    pal = Image.new("P", (2, 1))
    pal.putpalette([*RED, *BLUE] + [0] * (256 * 3 - 6))
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    pal.save(tmp_path / "p.png")
    img = load_image(tmp_path / "p.png")
    assert [_rgb(img, (x, 0)) for x in range(2)] == [RED, BLUE]

    pal.save(tmp_path / "pt.png", transparency=1)  # index 1 is transparent
    img = load_image(tmp_path / "pt.png")
    assert [_rgb(img, (x, 0)) for x in range(2)] == [RED, (128, 128, 128)]


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    cmyk.paste((0, 0, 0, 0), (8, 0, 16, 16))  # white
    cmyk.save(tmp_path / "c.jpg", quality=95)
    with Image.open(tmp_path / "c.jpg") as check:
        assert check.mode == "CMYK"
    img = load_image(tmp_path / "c.jpg")
    _assert_rgb8(img, (16, 16))
    assert np.abs(np.subtract(_rgb(img, (2, 8)), (255, 0, 0))).max() <= 8
    assert np.abs(np.subtract(_rgb(img, (13, 8)), (255, 255, 255))).max() <= 8


@pytest.mark.parametrize(
    ("orientation", "red_corner"),
    [
        (6, "top-right"),  # stored image is rotated 90° clockwise for display
        (8, "bottom-left"),  # ... 90° counter-clockwise
        (3, "bottom-right"),  # ... 180°
    ],
)
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int, red_corner: str) -> None:
    stored = Image.new("RGB", (60, 30), BLUE)
    stored.paste(RED, (0, 0, 12, 12))  # red block at the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.jpg"
    stored.save(path, quality=95, exif=exif)

    img = load_image(path)
    w, h = img.size
    assert (w, h) == ((30, 60) if orientation in (6, 8) else (60, 30))
    corners = {
        "top-left": (3, 3),
        "top-right": (w - 4, 3),
        "bottom-left": (3, h - 4),
        "bottom-right": (w - 4, h - 4),
    }
    for name, xy in corners.items():
        expected = RED if name == red_corner else BLUE
        assert np.abs(np.subtract(_rgb(img, xy), expected)).max() <= 12, (name, _rgb(img, xy))


# -- failures --------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.jpg"
    with pytest.raises(ImageError) as excinfo:
        load_image(path)
    message = _message_of(excinfo)
    assert message.startswith(f"{path}: ")
    assert "no such file" in message


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="is a directory") as excinfo:
        load_image(tmp_path)
    assert _message_of(excinfo).startswith(f"{tmp_path}: ")


@pytest.mark.parametrize("content", [b"hello, this is not a picture\n", b""])
def test_not_an_image(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "fake.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageError, match="not an image") as excinfo:
        load_image(path)
    assert _message_of(excinfo).startswith(f"{path}: ")


def test_truncated_jpeg(tmp_path: Path) -> None:
    good = tmp_path / "good.jpg"
    _noise(64, 64).save(good, quality=90)
    raw = good.read_bytes()
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(raw[: len(raw) // 2])
    with Image.open(bad) as check:  # the header is fine: only a full decode finds the damage
        assert check.size == (64, 64)
    with pytest.raises(ImageError, match="corrupt or truncated") as excinfo:
        load_image(bad)
    assert _message_of(excinfo).startswith(f"{bad}: ")


def test_png_with_garbage_data_is_corrupt(tmp_path: Path) -> None:
    path = _write_png(tmp_path / "garbage.png", 300, 300, 8, 2, b"\x13\x37" * 64)
    with pytest.raises(ImageError, match="corrupt or truncated") as excinfo:
        load_image(path)
    assert _message_of(excinfo).startswith(f"{path}: ")


def test_too_many_pixels_refused_from_the_header_alone(tmp_path: Path) -> None:
    # The same garbage-data file as above: with a low limit the error is "too large", not
    # "corrupt", which shows that no pixel data was decoded before refusing.
    path = _write_png(tmp_path / "bomb.png", 300, 300, 8, 2, b"\x13\x37" * 64)
    with pytest.raises(ImageError, match="exceeds the limit of 1,000") as excinfo:
        load_image(path, max_pixels=1000)
    message = _message_of(excinfo)
    assert message.startswith(f"{path}: ")
    assert "decompression bomb" in message
    assert "corrupt" not in message


def test_huge_header_refused_without_decoding(tmp_path: Path) -> None:
    # 100000 x 100000 declared, a few bytes of data: PIL's own hard limit or ours must refuse it
    path = _write_png(tmp_path / "huge.png", 100_000, 100_000, 8, 2, zlib.compress(b"\x00" * 10))
    with pytest.raises(ImageError, match="decompression bomb") as excinfo:
        load_image(path)
    assert _message_of(excinfo).startswith(f"{path}: ")


def test_max_pixels_default_and_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.new("RGB", (20, 20), RED).save(tmp_path / "x.png")
    assert load_image(tmp_path / "x.png", max_pixels=400).size == (20, 20)  # limit is inclusive
    with pytest.raises(ImageError, match="exceeds the limit"):
        load_image(tmp_path / "x.png", max_pixels=399)
    monkeypatch.setattr(images_mod, "MAX_PIXELS", 100)
    with pytest.raises(ImageError, match="exceeds the limit of 100"):
        load_image(tmp_path / "x.png")
    assert load_image(tmp_path / "x.png", max_pixels=10_000).size == (20, 20)


def test_pil_bomb_warning_and_error_become_image_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL warns > 1000, refuses > 2000
    Image.new("RGB", (40, 40), RED).save(tmp_path / "warn.png")  # 1600 pixels
    Image.new("RGB", (50, 50), RED).save(tmp_path / "hard.png")  # 2500 pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning may leak out
        with pytest.raises(ImageError, match="decompression bomb"):
            load_image(tmp_path / "warn.png", max_pixels=500)
        with pytest.raises(ImageError, match="decompression bomb"):
            load_image(tmp_path / "warn.png", max_pixels=1000)
        # a caller's limit above PIL's soft limit wins ...
        assert load_image(tmp_path / "warn.png", max_pixels=5000).size == (40, 40)
        # ... but not above PIL's hard limit
        with pytest.raises(ImageError, match="decompression bomb"):
            load_image(tmp_path / "hard.png", max_pixels=10_000)


# -- folders ---------------------------------------------------------------------------------------


def _make_tree(root: Path) -> dict[str, Path]:
    """root/{README.txt, a.png, .hidden.png, .git/x.png, sub/{b.jpg, broken.jpg, deeper/c.webp}}"""
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".git").mkdir()
    files = {
        # created in reverse order so that creation order cannot leak into the result
        "c": root / "sub" / "deeper" / "c.webp",
        "broken": root / "sub" / "broken.jpg",
        "b": root / "sub" / "b.jpg",
        "a": root / "a.png",
        "readme": root / "README.txt",
    }
    Image.new("RGB", (8, 8), BLUE).save(files["c"], lossless=True)
    _noise(32, 32).save(files["broken"], quality=90)
    files["broken"].write_bytes(files["broken"].read_bytes()[:300])
    Image.new("RGB", (8, 8), RED).save(files["b"], quality=95)
    Image.new("RGB", (8, 8), RED).save(files["a"])
    files["readme"].write_text("photos for the demo\n")
    Image.new("RGB", (8, 8), RED).save(root / ".hidden.png")
    Image.new("RGB", (8, 8), RED).save(root / ".git" / "x.png")
    return files


def test_find_images_walks_sorted_and_skips_hidden(tmp_path: Path) -> None:
    f = _make_tree(tmp_path)
    expected = [f["readme"], f["a"], f["b"], f["broken"], f["c"]]  # files, then sub-folders
    assert find_images(tmp_path) == expected
    assert find_images([tmp_path]) == expected
    assert find_images(tmp_path, recursive=False) == [f["readme"], f["a"]]
    # explicit files come back as given, even hidden or non-image ones
    hidden = tmp_path / ".hidden.png"
    assert find_images([hidden, f["readme"], tmp_path / "sub" / "deeper"]) == [
        hidden,
        f["readme"],
        f["c"],
    ]


def test_find_images_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "gone"
    with pytest.raises(ImageError, match="no such file or directory") as excinfo:
        find_images([tmp_path, missing])
    assert _message_of(excinfo).startswith(f"{missing}: ")
    with pytest.raises(ImageError, match="no image paths"):
        find_images([])


def test_load_images_skips_bad_files_in_folders_with_a_warning(tmp_path: Path) -> None:
    f = _make_tree(tmp_path)
    with pytest.warns(SkippedImageWarning) as record:
        loaded = load_images(tmp_path)
    assert [p for p, _ in loaded] == [f["a"], f["b"], f["c"]]
    assert all(img.mode == "RGB" and img.size == (8, 8) for _, img in loaded)
    skipped = [str(w.message) for w in record if issubclass(w.category, SkippedImageWarning)]
    assert len(skipped) == 2
    assert skipped[0].startswith(f"{f['readme']}: skipped: not an image")
    assert skipped[1].startswith(f"{f['broken']}: skipped: corrupt or truncated")
    # deterministic
    with pytest.warns(SkippedImageWarning):
        again = load_images(str(tmp_path))
    assert [p for p, _ in again] == [p for p, _ in loaded]


def test_explicit_bad_file_raises_even_next_to_a_folder(tmp_path: Path) -> None:
    f = _make_tree(tmp_path)
    with pytest.raises(ImageError, match="not an image") as excinfo:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SkippedImageWarning)
            load_images([tmp_path / "sub" / "deeper", f["readme"]])
    assert _message_of(excinfo).startswith(f"{f['readme']}: ")
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_images(f["broken"])


def test_folder_without_images(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("nothing to see")
    (tmp_path / "empty").mkdir()
    with pytest.warns(SkippedImageWarning, match="notes.txt: skipped"):
        with pytest.raises(ImageError, match="no images found") as excinfo:
            load_images(tmp_path)
    message = _message_of(excinfo)
    assert message.startswith(f"{tmp_path}: ")
    assert "1 unreadable file(s) skipped" in message
    with pytest.raises(ImageError, match="no images found"):
        load_images(tmp_path / "empty")


def test_iter_images_is_lazy_and_checks_paths_up_front(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(4):
        Image.new("RGB", (4, 4), RED).save(tmp_path / f"{i}.png")
    with pytest.raises(ImageError, match="no such file"):
        iter_images([tmp_path, tmp_path / "missing.png"])  # raised before any iteration

    calls: list[Path] = []
    real = images_mod.load_image

    def counting(path, max_pixels=None):  # type: ignore[no-untyped-def]
        calls.append(Path(path))
        return real(path, max_pixels)

    monkeypatch.setattr(images_mod, "load_image", counting)
    stream = iter_images(tmp_path)
    assert calls == []
    first_path, first_img = next(stream)
    assert first_path == tmp_path / "0.png" and first_img.size == (4, 4)
    assert calls == [tmp_path / "0.png"]
    assert [p.name for p, _ in stream] == ["1.png", "2.png", "3.png"]


def test_load_images_passes_max_pixels(tmp_path: Path) -> None:
    Image.new("RGB", (20, 20), RED).save(tmp_path / "big.png")
    Image.new("RGB", (5, 5), RED).save(tmp_path / "small.png")
    with pytest.warns(SkippedImageWarning, match="big.png: skipped: 20x20"):
        loaded = load_images(tmp_path, max_pixels=100)
    assert [p.name for p, _ in loaded] == ["small.png"]


def test_symlinked_sub_folders_are_followed_once_and_loops_end(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        _noise(8, 8, i).save(photos / f"p{i}.png")
    top = tmp_path / "dir"
    (top / "sub").mkdir(parents=True)
    _noise(8, 8, 9).save(top / "own.png")
    (top / "linked").symlink_to(photos, target_is_directory=True)
    (top / "again").symlink_to(photos, target_is_directory=True)  # the same folder twice
    (top / "sub" / "back").symlink_to(top, target_is_directory=True)  # a loop
    (top / "dangling").symlink_to(tmp_path / "nowhere", target_is_directory=True)
    found = data.find_images(top)
    names = [p.relative_to(top).as_posix() for p in found]
    assert names == ["own.png", "again/p0.png", "again/p1.png", "again/p2.png"]
    assert [p.name for p in data.find_images([top / "linked"])] == ["p0.png", "p1.png", "p2.png"]
    assert sum(1 for _ in data.iter_images(top)) == 4
