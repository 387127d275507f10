"""The atlas's section of ``OUT/index.html``: a link to the site and a table of its layers."""

from __future__ import annotations

from typing import Any

from convlens.probe import ReportSection
from convlens.render.report import esc

__all__ = ["atlas_section"]


def atlas_section(doc: dict[str, Any], href: str = "atlas/index.html") -> ReportSection:
    """A :class:`~convlens.ReportSection` linking the atlas at ``href`` (relative to the report)."""
    ds = doc["dataset"]
    rows = []
    for ld in doc["layers"]:
        rf = ld["receptive_field"] or {}
        size = "global" if not rf or rf.get("global") else "x".join(map(str, rf["size"]))
        page = href.rsplit("/", 1)[0] + f"/{ld['dir']}/index.html"
        rows.append(
            f"<tr><td><a href='{esc(page)}'>{esc(ld['layer'])}</a></td><td>{esc(size)}</td>"
            f"<td>{ld['units']} / {ld['channels']}</td><td>{esc(ld['rule'])}</td></tr>"
        )
    n_units = sum(ld["units"] for ld in doc["layers"])
    html = (
        f"<p><b><a href='{esc(href)}'>Open the atlas</a></b>: Fig. 2 (Section 4) for {n_units} "
        f"units of {len(doc['layers'])} layers of {esc(doc['model'])} — each unit's top-"
        f"{doc['k']} activations over {ds['images']} images ({esc(ds['source'])}), projected to "
        "pixels beside their image patches, with its activation distribution. Static pages: "
        "they open from the disk and can be shared as a folder.</p>"
        "<table><tr><th>layer</th><th>receptive field (px)</th><th>units shown / all</th>"
        "<th>rule</th></tr>" + "".join(rows) + "</table>"
    )
    return ReportSection("Atlas (Section 4, Fig. 2 for every unit)", html, [], order=15)
