"""The atlas as static pages, generated from ``atlas.json`` and each ``layer.json`` (every number on
a page can be traced to those files).

Layout (all links relative; no server, no network; opens from ``file://``)::

    atlas/index.html              one card per layer: its receptive field, unit count, rule and
                                  a strip of every unit's strongest patch (sortable)
    atlas/style.css, atlas.js     shared by every page (a few lines of plain JavaScript: sorting,
                                  the unit search box)
    atlas/atlas.json              the model, the dataset, the layers
    atlas/N-LAYER/index.html      the layer: a grid of all its units
    atlas/N-LAYER/layer.json      every unit: summary, top-k (image, position, value, crop box)
    atlas/N-LAYER/uCCCC.html      one unit: Fig. 2, its top-k, its activation distribution,
                                  links to the neighbouring units and back
    atlas/N-LAYER/img/uCCCC_fig2.png, _patch.png, _proj.png
                                  written once; the thumbnails serve the index and the layer page
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from convlens.io import write_text

__all__ = ["write_site"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1.2rem auto;
max-width:1200px;padding:0 1rem;color:#222;line-height:1.4}
h1{margin:.2rem 0 .3rem;font-size:1.5rem} h2{margin:.2rem 0;font-size:1.15rem}
a{color:#0645ad} .meta{color:#555;font-size:.9rem;margin:.2rem 0}
nav.crumbs{font-size:.9rem;margin-bottom:.4rem} nav.crumbs a{margin-right:.2rem}
nav.pager{display:flex;justify-content:space-between;margin:.5rem 0;font-size:.95rem}
.tools{display:flex;gap:1rem;align-items:center;flex-wrap:wrap;margin:.6rem 0;font-size:.9rem}
.tools input{width:9rem} #msg{color:#a33}
.card{border:1px solid #ddd;border-radius:6px;padding:.6rem .8rem;margin:.8rem 0;background:#fcfcfc}
.strip{display:flex;flex-wrap:wrap;gap:2px;margin-top:.4rem}
.strip a{display:block;line-height:0;border:2px solid transparent}
.strip img{width:32px;height:32px;image-rendering:pixelated}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(168px,1fr));gap:8px}
.unit{display:block;border:1px solid #ddd;border-radius:4px;padding:4px;text-decoration:none;
color:#222;background:#fff;font-size:.78rem;border-width:2px}
.unit img{width:72px;height:72px;image-rendering:pixelated} .unit b{font-size:.85rem}
.hit{border-color:#e07000 !important;background:#fff4e5}
table{border-collapse:collapse;font-size:.85rem;margin:.4rem 0} td,th{border:1px solid #ddd;
padding:.15rem .45rem;text-align:left} th{background:#f3f3f3} td.num{text-align:right}
figure{margin:.6rem 0} figure img{width:min(100%,780px);border:1px solid #eee}
.warn{background:#fff3cd;border:1px solid #e0c36b;padding:.4rem .7rem;border-radius:4px}
svg text{font-size:10px;fill:#444}
"""

_JS = r"""
(function () {
  "use strict";
  function num(el, key) {
    var v = parseFloat(el.getAttribute("data-" + key));
    return isNaN(v) ? -Infinity : v;
  }
  function sortAll(key) {
    var boxes = document.querySelectorAll("[data-sortable]");
    for (var b = 0; b < boxes.length; b++) {
      var items = Array.prototype.slice.call(boxes[b].children);
      items.sort(function (p, q) {
        if (key !== "unit") {
          var d = num(q, key) - num(p, key);
          if (d !== 0) { return d; }
        }
        return num(p, "unit") - num(q, "unit");
      });
      for (var i = 0; i < items.length; i++) { boxes[b].appendChild(items[i]); }
    }
  }
  var sel = document.getElementById("sort");
  if (sel) { sel.addEventListener("change", function () { sortAll(sel.value); }); }
  function pad(n) { var s = String(n); while (s.length < 4) { s = "0" + s; } return s; }
  var form = document.getElementById("search");
  if (!form) { return; }
  var msg = document.getElementById("msg");
  form.addEventListener("submit", function (ev) {
    ev.preventDefault();
    var text = form.elements.q.value.trim();
    var m = /^(?:(\d+)\s*[:\/ ]\s*)?(\d+)$/.exec(text);
    msg.textContent = "";
    if (!m) { msg.textContent = "enter a unit id, e.g. 17 (or LAYER:UNIT on the index)"; return; }
    var unit = parseInt(m[2], 10);
    var hits = document.querySelectorAll(".hit");
    for (var h = 0; h < hits.length; h++) { hits[h].classList.remove("hit"); }
    if (form.getAttribute("data-scope") === "layer") {
      var units = form.getAttribute("data-units").split(",");
      if (units.indexOf(String(unit)) < 0) { msg.textContent = "no unit " + unit + " in this layer"; return; }
      window.location.href = form.getAttribute("data-base") + "u" + pad(unit) + ".html";
      return;
    }
    var sel2 = '[data-unit="' + unit + '"]';
    if (m[1]) { sel2 = '[data-layer="' + parseInt(m[1], 10) + '"] ' + sel2; }
    var found = document.querySelectorAll(sel2);
    if (!found.length) { msg.textContent = "no unit " + text; return; }
    if (m[1] && found.length === 1) { window.location.href = found[0].getAttribute("href"); return; }
    for (var f = 0; f < found.length; f++) { found[f].classList.add("hit"); }
    found[0].scrollIntoView({block: "center"});
    msg.textContent = found.length + " unit(s) " + unit + " marked";
  });
})();
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _page(title: str, root: str, body: str) -> str:
    return (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{_e(title)}</title><link rel='icon' href='data:,'>"
        f"<link rel='stylesheet' href='{root}style.css'></head><body>\n{body}\n"
        f"<script src='{root}atlas.js'></script></body></html>\n"
    )


def _rf_text(ld: dict[str, Any]) -> str:
    rf = ld.get("receptive_field") or {}
    if not rf or rf.get("global"):
        return "global receptive field"
    size, stride = rf.get("size", []), rf.get("stride", [])
    one = lambda v: str(v[0]) if len(v) == 2 and v[0] == v[1] else "x".join(map(str, v))  # noqa: E731
    return (f"receptive field {one(size)} px, stride {one(stride)} "
            f"({ld['rf_share'] * 100:.0f}% of the input side)")  # fmt: skip


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "–"
    if pct:
        return f"{100 * float(v):.1f}%"
    f = float(v)
    return f"{f:.4g}"


def _attr(v: Any) -> str:
    return "" if v is None else f"{float(v):.7g}"


def _layer_title(ld: dict[str, Any]) -> str:
    alias = f" ({ld['alias']})" if ld.get("alias") else ""
    return f"layer {ld['index']}: {ld['layer']}{alias}"


def _search(scope: str, units: list[int] | None = None, base: str = "") -> str:
    data = (
        f" data-units='{','.join(map(str, units))}' data-base='{base}'" if units is not None else ""
    )
    hint = "unit id, e.g. 17" if scope == "layer" else "unit id or layer:unit, e.g. 3:17"
    return (f"<form id='search' data-scope='{scope}'{data}><label>find <input name='q' "
            f"type='search' placeholder='{hint}' aria-label='unit id'></label> "
            "<button type='submit'>go</button> <span id='msg' role='status'></span></form>")  # fmt: skip


def _sorter() -> str:
    return ("<label>sort units by <select id='sort'><option value='unit'>unit id</option>"
            "<option value='rate'>activation rate</option><option value='mean'>mean activation"
            "</option><option value='top'>top activation</option></select></label>")  # fmt: skip


def _data_attrs(u: dict[str, Any], layer_index: int) -> str:
    s = u["summary"]
    top = u["top"][0]["activation"] if u["top"] else None
    return (f"data-layer='{layer_index}' data-unit='{u['unit']}' data-rate='{_attr(s['rate'])}' "
            f"data-mean='{_attr(s['mean'])}' data-top='{_attr(top)}'")  # fmt: skip


def _meta(doc: dict[str, Any]) -> str:
    ds = doc["dataset"]
    src = ds["source"] if not ds["paths"] else ", ".join(ds["paths"][:3]) + (
        " …" if len(ds["paths"]) > 3 else "")  # fmt: skip
    rw = " (random weights)" if doc["random_weights"] else ""
    return (f"model <b>{_e(doc['model'])}</b>{_e(rw)} · {ds['images']} images mined from "
            f"{_e(src)}{' (' + str(ds['shards']) + ' tar shards)' if ds['shards'] else ''} · "
            f"top-{doc['k']} per unit, each from a different image · input "
            f"{doc['input_shape'][1]}x{doc['input_shape'][2]}")  # fmt: skip


def _index(doc: dict[str, Any], layers: list[dict[str, Any]]) -> str:
    cards = []
    for ld in layers:
        strip = []
        for u in ld["unit_pages"]:
            f = u["files"]
            if not f:
                continue
            s = u["summary"]
            tip = f"unit {u['unit']} · rate {_fmt(s['rate'], True)} · mean {_fmt(s['mean'])}"
            strip.append(f"<a href='{ld['dir']}/{f['page']}' {_data_attrs(u, ld['index'])} "
                         f"title='{_e(tip)}'><img src='{ld['dir']}/{f['patch']}' "
                         f"alt='unit {u['unit']}' width='32' height='32'></a>")  # fmt: skip
        spec = ld["rule_choice"].get("image_specificity")
        spec_s = "" if spec is None else f", image_specificity {spec:.2f}"
        crop = "x".join(map(str, ld["crop_size"]))
        cards.append(
            f"<section class='card' id='layer{ld['index']}'><h2><a href='{ld['dir']}/index.html'>"
            f"{_e(_layer_title(ld))}</a></h2><p class='meta'>{_e(_rf_text(ld))} · crops "
            f"{crop} px · {ld['units']} of {ld['channels']} units · map "
            f"{'x'.join(map(str, ld['map_shape']))} · rule <b>{_e(ld['rule'])}</b>{spec_s}</p>"
            f"<div class='strip' data-sortable>{''.join(strip)}</div></section>"
        )
    n_units = sum(ld["units"] for ld in layers)
    body = (
        f"<h1>Atlas of {_e(doc['model'])}</h1><p class='meta'>{_meta(doc)}</p>"
        + (
            "<p class='warn'>Random weights: these units show the architecture, not learned "
            "features.</p>"
            if doc["random_weights"]
            else ""
        )  # fmt: skip
        + f"<p>{len(layers)} layers, {n_units} units. Each square is a unit's strongest image "
        "patch (its receptive field in the image that excites it most); click it for the unit's "
        "Fig. 2 (Zeiler &amp; Fergus 2014, Section 4): its top activations projected to pixels "
        "beside their image patches.</p>"
        f"<div class='tools'>{_sorter()}{_search('index')}</div>"
        + "".join(cards)
        + "<p class='meta'>Data: <a href='atlas.json'>atlas.json</a> (model, dataset, layers) and "
        "one <code>layer.json</code> per layer (every unit's summary and top-k).</p>"
    )
    return _page(f"Atlas · {doc['model']}", "", body)


def _layer_page(doc: dict[str, Any], layers: list[dict[str, Any]], i: int) -> str:
    ld = layers[i]
    cells = []
    for u in ld["unit_pages"]:
        f = u["files"]
        if not f:
            continue
        s = u["summary"]
        top = u["top"][0]["activation"] if u["top"] else None
        cells.append(
            f"<a class='unit' href='{f['page']}' {_data_attrs(u, ld['index'])}>"
            f"<img src='{f['patch']}' alt='unit {u['unit']}: strongest patch' width='72' "
            f"height='72'> <img src='{f['projection']}' alt='unit {u['unit']}: its projection' "
            f"width='72' height='72'><br><b>unit {u['unit']}</b> top {_fmt(top)}<br>rate "
            f"{_fmt(s['rate'], True)} · mean {_fmt(s['mean'])}</a>"
        )
    prev_l = (f"<a href='../{layers[i - 1]['dir']}/index.html'>← {_e(_layer_title(layers[i - 1]))}"
              "</a>" if i > 0 else "<span></span>")  # fmt: skip
    next_l = (f"<a href='../{layers[i + 1]['dir']}/index.html'>{_e(_layer_title(layers[i + 1]))} →"
              "</a>" if i + 1 < len(layers) else "<span></span>")  # fmt: skip
    units = [u["unit"] for u in ld["unit_pages"] if u["files"]]
    body = (
        f"<nav class='crumbs'><a href='../index.html'>atlas</a> › {_e(_layer_title(ld))}</nav>"
        f"<h1>{_e(_layer_title(ld))}</h1><p class='meta'>{_meta(doc)}</p>"
        f"<p class='meta'>{_e(_rf_text(ld))} · crops {'x'.join(map(str, ld['crop_size']))} px · "
        f"{ld['units']} of {ld['channels']} units · rule <b>{_e(ld['rule'])}</b>: "
        f"{_e(ld['rule_choice']['reason'])}</p>"
        f"<nav class='pager'>{prev_l}{next_l}</nav>"
        f"<div class='tools'>{_sorter()}{_search('layer', units)}</div>"
        "<p class='meta'>Each unit: its strongest image patch and that activation projected to "
        "pixels; top = its strongest activation over the images; rate = share of positions "
        "where it is positive; mean = its mean activation.</p>"
        f"<div class='grid' data-sortable>{''.join(cells)}</div>"
        "<p class='meta'>Data: <a href='layer.json'>layer.json</a></p>"
    )
    return _page(f"{ld['layer']} · atlas of {doc['model']}", "../", body)


def _histogram_svg(u: dict[str, Any]) -> str:
    h = u["histogram"]
    counts = h["counts"]
    if not counts:
        return ""
    W, H, pad = 420, 110, 24
    n = len(counts)
    peak = max(counts) or 1
    bw = (W - 2 * pad) / n
    left, width = h["left"], h["width"]
    lo, hi = left, left + width * n
    bars = []
    for j, c in enumerate(counts):
        bh = (H - 2 * pad) * c / peak
        bars.append(f"<rect x='{pad + j * bw:.1f}' y='{H - pad - bh:.1f}' width='{max(bw - 1, 1):.1f}' "
                    f"height='{bh:.1f}' fill='#8aa8d0'><title>{c} images in "
                    f"[{left + j * width:.4g}, {left + (j + 1) * width:.4g})</title></rect>")  # fmt: skip
    marks = []
    span = (hi - lo) or 1.0
    for t in u["top"]:
        x = pad + (W - 2 * pad) * min(max((t["activation"] - lo) / span, 0), 1)
        marks.append(f"<line x1='{x:.1f}' x2='{x:.1f}' y1='{pad - 6}' y2='{H - pad}' "
                     "stroke='#d9480f' stroke-width='1'/>")  # fmt: skip
    return (
        f"<svg width='{W}' height='{H}' viewBox='0 0 {W} {H}' role='img' aria-label='histogram'>"
        + "".join(bars)
        + "".join(marks)
        + f"<line x1='{pad}' x2='{W - pad}' y1='{H - pad}' y2='{H - pad}' stroke='#444'/>"
        f"<text x='{pad}' y='{H - 6}'>{lo:.3g}</text>"
        f"<text x='{W - pad}' y='{H - 6}' text-anchor='end'>{hi:.3g}</text>"
        f"<text x='{pad}' y='12'>per-image strongest activation (images per bar; red: the "
        "top-k)</text></svg>"
    )


def _where(t: dict[str, Any]) -> str:
    return "–" if t["y"] < 0 else f"{t['y']}, {t['x']}"


def _unit_page(doc: dict[str, Any], ld: dict[str, Any], j: int, shown: list[int]) -> str:
    u = ld["unit_pages"][j]
    s = u["summary"]
    f = u["files"]
    pos = shown.index(j)
    prev_u = ld["unit_pages"][shown[pos - 1]] if pos > 0 else None
    next_u = ld["unit_pages"][shown[pos + 1]] if pos + 1 < len(shown) else None
    prev_l = (f"<a href='{prev_u['files']['page']}' rel='prev'>← unit {prev_u['unit']}</a>"
              if prev_u else "<span></span>")  # fmt: skip
    next_l = (f"<a href='{next_u['files']['page']}' rel='next'>unit {next_u['unit']} →</a>"
              if next_u else "<span></span>")  # fmt: skip
    rows = "".join(
        f"<tr><td class='num'>{t['rank'] + 1}</td><td class='num'>{t['activation']:.4g}</td>"
        f"<td title='{_e(t['image'])}'>{_e(t['name'])}</td><td class='num'>{_where(t)}</td>"
        f"<td>{', '.join(map(str, t['crop']))}</td></tr>"
        for t in u["top"]
    )
    qs = "".join(
        f"<tr><th>quantile {float(q) * 100:g}%</th><td class='num'>{_fmt(v)}</td></tr>"
        for q, v in s["quantiles"].items()
    )
    summary = (
        f"<table><tr><th>images</th><td class='num'>{s['images']}</td></tr>"
        f"<tr><th>mean activation (all positions)</th><td class='num'>{_fmt(s['mean'])}</td></tr>"
        f"<tr><th>activation rate (positions &gt; 0)</th><td class='num'>{_fmt(s['rate'], True)}"
        f"</td></tr><tr><th>mean of the per-image strongest</th><td class='num'>"
        f"{_fmt(s['max_mean'])}</td></tr><tr><th>per-image strongest: min</th><td class='num'>"
        f"{_fmt(s['max_min'])}</td></tr>{qs}<tr><th>per-image strongest: max</th>"
        f"<td class='num'>{_fmt(s['max_max'])}</td></tr></table>"
        f"<p class='meta'>Quantiles from a {doc['sketch_bins']}-bin histogram sketch: within "
        f"{_fmt(s['sketch_bin_width'])} (one bin) of the exact value. {s['positions']} "
        "position(s) per image.</p>"
    )
    body = (
        f"<nav class='crumbs'><a href='../index.html'>atlas</a> › <a href='index.html'>"
        f"{_e(_layer_title(ld))}</a> › unit {u['unit']}</nav>"
        f"<nav class='pager'>{prev_l}<a href='index.html'>all units of this layer</a>{next_l}</nav>"
        f"<h1>{_e(ld['layer'])} · unit {u['unit']}</h1><p class='meta'>{_meta(doc)}</p>"
        f"<p class='meta'>{_e(_rf_text(ld))} · crop {'x'.join(map(str, ld['crop_size']))} px · "
        f"rule <b>{_e(ld['rule'])}</b></p>"
        f"<div class='tools'>{_search('layer', [ld['unit_pages'][k]['unit'] for k in shown])}</div>"
        f"<figure><img src='{f['fig2']}' alt='Fig. 2 of unit {u['unit']}: top activations "
        "projected beside their image patches'><figcaption class='meta'>Left: each activation "
        "projected to pixels (contrast-normalised per tile, grey = 0); right: the image patch it "
        "comes from (the unit's crop; light grey outside the image).</figcaption></figure>"
        f"<h2>Top {len(u['top'])}</h2><table><tr><th>#</th><th>activation</th><th>image</th>"
        f"<th>position (y, x) in the map</th><th>crop box (x0, y0, x1, y1), input px</th></tr>"
        f"{rows}</table>"
        f"<h2>Activation distribution</h2>{_histogram_svg(u)}{summary}"
        "<p class='meta'>Data: <a href='layer.json'>layer.json</a> · "
        "<a href='../atlas.json'>atlas.json</a></p>"
    )
    return _page(f"{ld['layer']} unit {u['unit']} · atlas of {doc['model']}", "../", body)


def write_site(out: Path, doc: dict[str, Any], layers: list[dict[str, Any]]) -> list[Path]:
    """Write every page of the atlas under ``out`` (module docstring); returns the files."""
    files = [
        write_text(out / "style.css", _CSS.lstrip()),
        write_text(out / "atlas.js", _JS.lstrip()),
    ]
    files.append(write_text(out / "index.html", _index(doc, layers)))
    for i, ld in enumerate(layers):
        d = out / ld["dir"]
        files.append(write_text(d / "index.html", _layer_page(doc, layers, i)))
        shown = [j for j, u in enumerate(ld["unit_pages"]) if u["files"]]
        for j in shown:
            files.append(write_text(d / ld["unit_pages"][j]["files"]["page"],
                                    _unit_page(doc, ld, j, shown)))  # fmt: skip
    return files
