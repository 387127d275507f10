"""The HTML report: ``OUT/index.html`` gathers the sections every probe wrote into ``OUT``.

Each probe run writes ``OUT/<probe>/section.json`` (title, HTML fragment, figure paths); the
report is rebuilt from all sections present after every run, so probes run one by one into the
same folder end up in one report.
"""

from __future__ import annotations

import html
import json
from datetime import datetime, timezone
from pathlib import Path

from convlens.io import write_json, write_text

__all__ = ["write_section", "build_report", "esc"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2rem auto;
max-width:1100px;padding:0 1rem;color:#222;line-height:1.45}
h1{margin-bottom:.2rem} h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2.2rem}
.meta{color:#666;font-size:.9rem} img{max-width:100%;image-rendering:pixelated;border:1px solid #eee}
table{border-collapse:collapse;font-size:.9rem;margin:.6rem 0} td,th{border:1px solid #ddd;
padding:.2rem .5rem;text-align:left} th{background:#f6f6f6} .warn{background:#fff3cd;
border:1px solid #e0c36b;padding:.5rem .8rem;border-radius:4px} figure{margin:1rem 0}
figcaption{color:#555;font-size:.9rem} nav a{margin-right:1rem}
"""


def esc(text: object) -> str:
    return html.escape(str(text))


def write_section(out_root: Path, key: str, section) -> Path:
    """Store a section as ``out_root/key/section.json``."""
    return write_json(Path(out_root) / key / "section.json", {"key": key, **section.to_dict()})


def build_report(out_root: Path, title: str = "convlens report", meta: dict | None = None) -> Path:
    """(Re)build ``out_root/index.html`` from every ``*/section.json`` below it."""
    out_root = Path(out_root)
    sections = []
    for path in sorted(out_root.glob("*/section.json")):
        if path.parent.name.startswith("."):  # a staging folder, not a finished run
            continue
        try:
            sections.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError):
            continue
    sections.sort(key=lambda s: (s.get("order", 50), s.get("key", "")))
    meta = dict(meta or {})
    meta.setdefault("generated", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    nav = " ".join(f'<a href="#{esc(s["key"])}">{esc(s["title"])}</a>' for s in sections)
    body = [
        f"<h1>{esc(title)}</h1>",
        '<p class="meta">' + " · ".join(f"{esc(k)}: {esc(v)}" for k, v in meta.items()) + "</p>",
        f"<nav>{nav}</nav>",
    ]
    for s in sections:
        body.append(
            f'<section id="{esc(s["key"])}"><h2>{esc(s["title"])}</h2>{s["html"]}</section>'
        )
    if not sections:
        body.append("<p>No probe has written a section into this folder yet.</p>")
    page = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )
    return write_text(out_root / "index.html", page)
