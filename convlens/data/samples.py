"""Real photos that ship inside installed packages, for demos and tests without any download.

scikit-image keeps a few images in ``skimage/data/`` (most of its gallery is fetched on demand with
pooch; only files already on disk are used here, never the fetchers) and scikit-learn keeps two
photos in ``sklearn/datasets/images/``. :func:`list_samples` is a curated set of colour natural
photos among them; the grayscale, tiny and synthetic files (camera, coins, chessboard, logo, horse
silhouette, colour wheel, ...) are left out. :func:`lfw_faces` reads scikit-image's 25x25 LFW crops.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convlens._registry import close_matches
from convlens.errors import ConvlensError, ImageError

__all__ = [
    "Sample",
    "DEFAULT_SAMPLES",
    "list_samples",
    "sample",
    "default_images",
    "lfw_faces",
    "LFW_FACES",
]

#: Number of face crops in ``skimage/data/lfw_subset.npy`` (the next 100 are non-faces).
LFW_FACES = 100


@dataclass(frozen=True)
class Sample:
    """One bundled photo.

    Attributes:
        name: short name (the file stem), e.g. ``"coffee"``.
        path: absolute path of the file inside the installed package.
        source: the package that ships it: ``"scikit-image"`` or ``"scikit-learn"``.
        description: what the photo shows, in a few words.
        credit: photographer / licence, as given by the shipping package.
    """

    name: str
    path: Path
    source: str
    description: str
    credit: str = ""

    @property
    def exists(self) -> bool:
        """Whether the file is on disk (shipped with the package; a trimmed install may lack it)."""
        return self.path.is_file()


def _package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImageError(f"{package}: not installed; its bundled sample images are unavailable")
    return Path(next(iter(spec.submodule_search_locations)))


_SKIMAGE = "scikit-image"
_SKLEARN = "scikit-learn"

# (name, package, relative path, description, credit); order is the display order
_CATALOGUE: tuple[tuple[str, str, str, str, str], ...] = (
    (
        "coffee",
        _SKIMAGE,
        "data/coffee.png",
        "a cup of espresso on a saucer, wooden table",
        "Rachel Michetti, CC0 (courtesy of Pikolo Espresso Bar)",
    ),
    (
        "chelsea",
        _SKIMAGE,
        "data/chelsea.png",
        "Chelsea the tabby cat, face close-up",
        "Stefan van der Walt, CC0",
    ),
    (
        "astronaut",
        _SKIMAGE,
        "data/astronaut.png",
        "portrait of astronaut Eileen Collins in an orange suit, flag and shuttle behind",
        "NASA, public domain",
    ),
    (
        "rocket",
        _SKIMAGE,
        "data/rocket.jpg",
        "Falcon 9 rocket on its launch pad at dusk",
        "SpaceX, public domain",
    ),
    (
        "motorcycle_left",
        _SKIMAGE,
        "data/motorcycle_left.png",
        "red motorcycle parked in a garage (left view of a stereo pair)",
        "Middlebury 2014 stereo benchmark (Scharstein et al.), downsampled x4",
    ),
    (
        "china",
        _SKLEARN,
        "datasets/images/china.jpg",
        "Chinese pagoda-style temple on a wooded hill by a lake",
        "danielbuechele on Flickr, CC BY 2.0",
    ),
    (
        "flower",
        _SKLEARN,
        "datasets/images/flower.jpg",
        "orange dahlia flower in front of dark green foliage",
        "vultilion on Flickr, CC BY 2.0",
    ),
    (
        "hubble_deep_field",
        _SKIMAGE,
        "data/hubble_deep_field.jpg",
        "Hubble eXtreme Deep Field: galaxies on a black sky",
        "NASA, public domain",
    ),
    (
        "retina",
        _SKIMAGE,
        "data/retina.jpg",
        "fundus photograph of a human retina (left eye)",
        "Mikael Häggström via Wikimedia Commons, CC0",
    ),
    (
        "ihc",
        _SKIMAGE,
        "data/ihc.png",
        "immunohistochemistry micrograph: DAB-stained colonic glands, hematoxylin counterstain",
        "Center for Microscopy And Molecular Imaging (CMMI), no known copyright restrictions",
    ),
)

_PACKAGES = {_SKIMAGE: "skimage", _SKLEARN: "sklearn"}

#: The small default set for demos, in a fixed order (coffee first).
DEFAULT_SAMPLES: tuple[str, ...] = (
    "coffee",
    "chelsea",
    "astronaut",
    "rocket",
    "motorcycle_left",
    "china",
)


def list_samples() -> list[Sample]:
    """The curated bundled photos (colour, natural, at least 300 pixels a side), in a fixed order.

    Paths point inside the installed scikit-image / scikit-learn; :attr:`Sample.exists` tells
    whether each file is present.

    Raises:
        ImageError: scikit-image or scikit-learn is not installed.
    """
    dirs = {src: _package_dir(pkg) for src, pkg in _PACKAGES.items()}
    return [
        Sample(name=name, path=dirs[src] / rel, source=src, description=desc, credit=credit)
        for name, src, rel, desc, credit in _CATALOGUE
    ]


def sample(name: str) -> Sample:
    """The bundled photo called ``name``.

    Raises:
        ConvlensError: an unknown name (with the close matches).
        ImageError: the file is missing from the installed package.
    """
    samples = {s.name: s for s in list_samples()}
    if name not in samples:
        hint = close_matches(name, list(samples))
        raise ConvlensError(f"unknown sample {name!r}{hint} (available: {', '.join(samples)})")
    found = samples[name]
    if not found.exists:
        raise ImageError(
            f"{found.path}: sample {name!r} is missing from the installed {found.source}"
        )
    return found


def default_images(n: int | None = None) -> list[Path]:
    """Paths of the first ``n`` (default all) photos of :data:`DEFAULT_SAMPLES`, in that order.

    Raises:
        ConvlensError: ``n`` is not between 1 and ``len(DEFAULT_SAMPLES)``.
        ImageError: a default photo is missing from the installed package.
    """
    count = len(DEFAULT_SAMPLES) if n is None else n
    if not 1 <= count <= len(DEFAULT_SAMPLES):
        raise ConvlensError(f"default_images n={n!r}: must be between 1 and {len(DEFAULT_SAMPLES)}")
    return [sample(name).path for name in DEFAULT_SAMPLES[:count]]


def lfw_faces(n: int | None = 5) -> np.ndarray:
    """The first ``n`` (default 5; ``None`` for all 100) face crops of scikit-image's LFW subset.

    ``skimage/data/lfw_subset.npy`` holds 200 grayscale 25x25 crops: 100 faces (randomly chosen
    from Labeled Faces in the Wild, Huang et al. 2012) then 100 non-face background patches. It is
    stored as float64 in [0, 1] (scikit-image's docstring says uint8; integer data would be scaled
    by 1/255 here). Returns a new float64 array of shape ``(n, 25, 25)`` with values in [0, 1].

    Raises:
        ConvlensError: ``n`` outside 1..100.
        ImageError: the file is missing or not the expected shape.
    """
    count = LFW_FACES if n is None else n
    if (
        isinstance(count, bool)
        or not isinstance(count, (int, np.integer))
        or not 1 <= count <= LFW_FACES
    ):
        raise ConvlensError(f"lfw_faces n={n!r}: must be between 1 and {LFW_FACES}")
    path = _package_dir("skimage") / "data" / "lfw_subset.npy"
    if not path.is_file():
        raise ImageError(f"{path}: missing from the installed scikit-image")
    data = np.load(path, allow_pickle=False)
    if data.ndim != 3 or data.shape[0] < LFW_FACES:
        raise ImageError(f"{path}: expected (200, H, W) crops, found shape {data.shape}")
    faces = data[:count]
    if np.issubdtype(faces.dtype, np.integer):
        return faces.astype(np.float64) / 255.0
    return faces.astype(np.float64, copy=True)
