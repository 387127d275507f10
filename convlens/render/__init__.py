"""Arrays → PNG figures, and the HTML report that gathers every probe's section."""

from convlens.render.figures import (
    colormap,
    contrast_stretch,
    grid,
    overlay,
    robust_stretch,
    save_png,
    to_uint8,
)
from convlens.render.report import build_report, write_section

__all__ = [
    "save_png",
    "grid",
    "overlay",
    "colormap",
    "contrast_stretch",
    "robust_stretch",
    "to_uint8",
    "write_section",
    "build_report",
]
