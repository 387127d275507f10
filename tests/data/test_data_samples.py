"""convlens.data.samples: the photos bundled with scikit-image / scikit-learn are really there."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from convlens.data import (
    DEFAULT_SAMPLES,
    Sample,
    default_images,
    lfw_faces,
    list_samples,
    load_image,
    sample,
)
from convlens.errors import ConvlensError


def test_list_samples_is_a_curated_set_of_existing_files() -> None:
    samples = list_samples()
    assert 8 <= len(samples) <= 12
    names = [s.name for s in samples]
    assert len(set(names)) == len(names)
    assert names[0] == "coffee"
    for s in samples:
        assert isinstance(s, Sample)
        assert s.exists and s.path.is_file() and s.path.is_absolute(), s
        assert s.source in ("scikit-image", "scikit-learn")
        assert (s.source == "scikit-image") == ("skimage" in s.path.parts)
        assert len(s.description.split()) >= 3, s
        assert s.credit
    assert {"china", "flower"} <= {s.name for s in samples if s.source == "scikit-learn"}


def test_every_sample_loads_as_a_colour_photo() -> None:
    for s in list_samples():
        img = load_image(s.path)
        assert img.mode == "RGB", s.name
        assert min(img.size) >= 300, (s.name, img.size)
        pixels = np.asarray(img, dtype=np.int16)
        # colour, not grey stored as RGB: channels differ noticeably somewhere
        assert np.abs(pixels[..., 0] - pixels[..., 2]).mean() > 5, s.name
        assert pixels.std() > 10, s.name  # not a flat synthetic image


def test_sample_by_name_and_close_matches() -> None:
    coffee = sample("coffee")
    assert coffee.path.name == "coffee.png" and coffee.source == "scikit-image"
    assert sample("china").path.name == "china.jpg"
    with pytest.raises(ConvlensError, match=r"^unknown sample 'cofee' \(did you mean: coffee"):
        sample("cofee")
    with pytest.raises(ConvlensError, match="available: coffee, chelsea"):
        sample("camera")  # grayscale: deliberately not in the curated set


def test_default_images_fixed_order() -> None:
    paths = default_images()
    assert DEFAULT_SAMPLES == (
        "coffee",
        "chelsea",
        "astronaut",
        "rocket",
        "motorcycle_left",
        "china",
    )
    assert [p.name for p in paths] == [
        "coffee.png",
        "chelsea.png",
        "astronaut.png",
        "rocket.jpg",
        "motorcycle_left.png",
        "china.jpg",
    ]
    assert all(isinstance(p, Path) and p.is_file() for p in paths)
    assert default_images(2) == paths[:2]
    assert default_images() == paths  # deterministic
    for bad in (0, len(DEFAULT_SAMPLES) + 1):
        with pytest.raises(ConvlensError, match="default_images n="):
            default_images(bad)


def test_lfw_faces() -> None:
    faces = lfw_faces()
    assert faces.shape == (5, 25, 25)
    assert faces.dtype == np.float64
    assert 0.0 <= faces.min() and faces.max() <= 1.0
    assert faces.std() > 0.05  # real pictures, not a blank array
    every = lfw_faces(None)
    assert every.shape == (100, 25, 25)
    np.testing.assert_array_equal(every[:5], faces)
    faces[0, 0, 0] = -1.0  # a copy: the next caller gets the original data
    assert lfw_faces(1)[0, 0, 0] >= 0.0
    for bad in (0, 101, 2.5):
        with pytest.raises(ConvlensError, match="lfw_faces n="):
            lfw_faces(bad)  # type: ignore[arg-type]
