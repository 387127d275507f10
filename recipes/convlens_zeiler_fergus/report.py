"""``report/index.html``: our numbers beside the paper's Tables 2 and 3, then the figures and the
probes' sections (Tables 1, 4-7 and Figs. 2, 5, 7 where their plugins produced them).

    convlens recipe zeiler-fergus --report-only            # rebuild from the files in --out
    from convlens_zeiler_fergus.report import build_report; build_report(Path("runs/zeiler-fergus"))

Every number on the page is read from this run's files (``eval.json``, ``val_probs.npy``,
``metrics.jsonl``, ``analysis.json``, the probes' ``section.json``); ensembles are computed here
from the members' saved softmax outputs. ``report/report.json`` holds every number shown.
"""

from __future__ import annotations

import html
import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from convlens.io import write_json, write_text
from convlens_zeiler_fergus import paper
from convlens_zeiler_fergus.evaluate import ensemble
from convlens_zeiler_fergus.experiments import EXPERIMENTS

__all__ = ["build_report", "discover_runs"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2rem auto;
max-width:1150px;padding:0 1rem;color:#222;line-height:1.45}
h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2.2rem}
table{border-collapse:collapse;font-size:.9rem;margin:.6rem 0}
td,th{border:1px solid #ddd;padding:.2rem .5rem;text-align:left} th{background:#f6f6f6}
td.n{text-align:right;font-variant-numeric:tabular-nums} td.ours{background:#eef6ff}
.note{background:#fff3cd;border:1px solid #e0c36b;padding:.5rem .8rem;border-radius:4px}
img{max-width:100%;image-rendering:pixelated;border:1px solid #eee}
figure{margin:1rem 0} figcaption{color:#555;font-size:.9rem} .meta{color:#666;font-size:.9rem}
"""


def esc(x: object) -> str:
    return html.escape(str(x))


def _num(v: float | None, digits: int = 1) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def discover_runs(out: Path) -> dict[str, list[Path]]:
    """experiment → its trained run folders (those with ``eval.json``), members in order."""
    runs: dict[str, list[Path]] = {}
    for name in EXPERIMENTS:
        base = out / name
        if (base / "eval.json").is_file():
            runs[name] = [base]
        else:
            members = sorted(
                base.glob("member*/eval.json"),
                key=lambda p: int(re.sub(r"\D", "", p.parent.name) or 0),
            )
            if members:
                runs[name] = [m.parent for m in members]
    return runs


def _ensembles(runs: dict[str, list[Path]]) -> dict[str, dict[str, Any]]:
    out = {}
    if len(runs.get("zfnet", [])) >= 2:
        out["ens:zfnet"] = ensemble(runs["zfnet"])
    if runs.get("zfnet") and runs.get("zfnet-wide"):
        out["ens:zfnet+zfnet-wide"] = ensemble(runs["zfnet"] + runs["zfnet-wide"])
    for name, dirs in runs.items():
        if name != "zfnet" and len(dirs) >= 2:
            out[f"ens:{name}"] = ensemble(dirs)
    return out


def _ours(
    key: str | None, evals: dict[str, dict[str, Any]], ens: dict[str, dict[str, Any]]
) -> dict[str, Any] | None:
    if key is None:
        return None
    if key.startswith("ens:"):
        e = ens.get(key)
        return (
            None
            if e is None
            else {
                "val_top1": e["top1_err"],
                "val_top5": e["top5_err"],
                "train_top1": None,
                "members": len(e["members"]),
            }
        )
    ev = evals.get(key)
    if ev is None:
        return None
    return {
        "val_top1": ev["val"]["top1_err"],
        "val_top5": ev["val"]["top5_err"],
        "train_top1": ev["train"].get("top1_err"),
        "members": 1,
    }


def _table(
    rows: tuple[paper.PaperRow, ...],
    cols: list[tuple[str, str]],
    evals: dict[str, dict[str, Any]],
    ens: dict[str, dict[str, Any]],
) -> tuple[str, list[dict[str, Any]]]:
    head = "".join(f"<th>paper {esc(t)}</th>" for _, t in cols)
    head += "".join(f"<th>ours {esc(t)}</th>" for k, t in cols if k != "test_top5")
    body, record = [], []
    for row in rows:
        ours = _ours(row.ours, evals, ens)
        cells = "".join(f'<td class="n">{_num(getattr(row, k))}</td>' for k, _ in cols)
        for k, _ in cols:
            if k == "test_top5":
                continue
            v = None if ours is None else ours.get(k)
            cells += f'<td class="n ours">{_num(v, 2)}</td>'
        tag = f" <small>[{esc(row.ours)}]</small>" if row.ours else ""
        body.append(f"<tr><td>{esc(row.label)}{tag}</td>{cells}</tr>")
        record.append(
            {
                "row": row.label,
                "experiment": row.ours,
                "paper": {k: getattr(row, k) for k, _ in cols},
                "ours": ours,
            }
        )
    return (f"<table><tr><th>Error %</th>{head}</tr>{''.join(body)}</table>", record)


def _rewrite_src(fragment: str, prefix: str) -> str:
    return re.sub(
        r'src="(?!https?:|data:|/)([^"]+)"', lambda m: f'src="{prefix}{m.group(1)}"', fragment
    )


def build_report(out: Path, meta: dict[str, Any] | None = None) -> Path:
    """(Re)build ``out/report/index.html`` and ``out/report/report.json`` from the files in
    ``out``."""
    out = Path(out)
    runs = discover_runs(out)
    evals = {name: _load(dirs[0] / "eval.json") or {} for name, dirs in runs.items()}
    ens = _ensembles(runs)
    meta = dict(meta or {})
    recipe = _load(out / "recipe.json") or {}
    t2_html, t2 = _table(
        paper.TABLE2,
        [("val_top1", "Val Top-1"), ("val_top5", "Val Top-5"), ("test_top5", "Test Top-5")],
        evals,
        ens,
    )
    t3_html, t3 = _table(
        paper.TABLE3,
        [("train_top1", "Train Top-1"), ("val_top1", "Val Top-1"), ("val_top5", "Val Top-5")],
        evals,
        ens,
    )
    miniature = recipe.get("miniature", False)
    body = [
        "<h1>Zeiler &amp; Fergus (2014), reproduced</h1>",
        '<p class="meta">'
        + " · ".join(
            f"{esc(k)}: {esc(v)}"
            for k, v in {
                "data": recipe.get("data", "?"),
                "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                **meta,
            }.items()
        )
        + "</p>",
    ]
    if miniature:
        body.append(
            '<p class="note">This is the <b>embedded miniature</b>: a quarter-width network at '
            f"{esc(recipe.get('input_size', '?'))}×{esc(recipe.get('input_size', '?'))} trained "
            "for a few epochs on a generated 12-class set (shapes, textures, colours; chance "
            "error 91.7 %). Its errors are not comparable with the paper's ImageNet numbers; "
            "the tables show where each of our runs goes. Run with <code>--data</code> on "
            "ImageNet for the real comparison.</p>"
        )
    if not runs:
        body.append("<p>No trained run in this folder yet.</p>")
    body += [
        "<h2>Table 2 — ImageNet 2012 classification error</h2>",
        f"<p>{esc(paper.TABLE2_CAPTION)} Ours: ten-crop validation error of this run; we "
        "have no test-set numbers.</p>",
        t2_html,
        "<h2>Table 3 — architectural changes</h2>",
        f"<p>{esc(paper.TABLE3_CAPTION)} Ours: train top-1 on a fixed subset of the "
        "training images, val errors with ten crops.</p>",
        t3_html,
    ]
    if ens:
        body.append(
            "<h3>Ensembles (softmax average)</h3><table><tr><th>ensemble</th>"
            "<th>members</th><th>val top-1</th><th>val top-5</th></tr>"
            + "".join(
                f"<tr><td>{esc(k[4:])}</td><td>{len(v['members'])}</td>"
                f'<td class="n">{_num(v["top1_err"], 2)}</td>'
                f'<td class="n">{_num(v["top5_err"], 2)}</td></tr>'
                for k, v in ens.items()
            )
            + "</table>"
        )
    record_runs = {}
    for name, dirs in runs.items():
        rd = dirs[0]
        rel = f"../{rd.relative_to(out).as_posix()}/"
        ev = evals[name]
        an = _load(rd / "analysis.json") or {}
        record_runs[name] = {"dirs": [str(d) for d in dirs], "eval": ev, "analysis": an}
        body.append(f'<h2 id="{esc(name)}">{esc(name)} — {esc(EXPERIMENTS[name].description)}</h2>')
        sp = ev.get("speed", {})
        body.append(
            "<p>"
            + esc(
                f"{ev.get('epochs')} epochs, {ev.get('global_step')} steps, "
                f"{ev.get('parameters', 0):,} parameters; training "
                f"{_num(ev.get('train_wall_s'), 0)} s on {ev.get('device')} "
                f"({ev.get('device_name')}) × {ev.get('world_size')}, median "
                f"{_num(ev.get('median_img_per_s'), 0)} img/s, {sp.get('precision')}, "
                f"channels_last={sp.get('channels_last')}, optimizer {sp.get('optimizer')}, "
                f"compile={sp.get('compile')}; crops from {ev.get('data_source')}. "
                f"Val top-1 {_num(ev['val']['top1_err'], 2)} %, top-5 "
                f"{_num(ev['val']['top5_err'], 2)} % ({ev['val'].get('crops')} crops, "
                f"{ev['val'].get('n')} images); train top-1 {_num(ev['train'].get('top1_err'), 2)}"
                f" % ({ev['train'].get('n')} images)."
            )
            + "</p>"
        )
        figs = an.get("figures", {})
        captions = {
            "curves": "Training loss per logged step; validation error per epoch (centre crop).",
            "filters": "First-layer filters of the trained model, each contrast-stretched "
            "(cf. Fig. 6(c)).",
            "filter_evolution": "First-layer filters (columns) at the snapshot epochs (rows: "
            + ", ".join(an.get("snapshot_epochs", []))
            + ").",
        }
        for key in ("curves", "filters", "filter_evolution"):
            if key in figs:
                body.append(
                    f'<figure><img src="{rel}{esc(figs[key])}" alt="{key}">'
                    f"<figcaption>{esc(captions[key])}</figcaption></figure>"
                )
        evo = an.get("feature_evolution")
        if evo:
            if evo.get("status") == "ok" and evo.get("figures"):
                body.append("<h3>Fig. 4 — feature evolution during training</h3>")
                for f in evo["figures"]:
                    body.append(
                        f'<figure><img src="{rel}{esc(f)}" alt="{esc(f)}"><figcaption>'
                        f"{esc(Path(f).stem)}: strongest activation of each feature "
                        "over the training images, projected to pixel space, at the "
                        "snapshot epochs.</figcaption></figure>"
                    )
            else:
                body.append(
                    f'<p class="note">Fig. 4 not produced: {esc(evo.get("status"))} '
                    f"{esc(evo.get('error', ''))}</p>"
                )
        probes = an.get("probes")
        if probes:
            body.append(
                "<h3>Probes on this model</h3><table><tr><th>probe</th><th>status</th>"
                "<th>time</th></tr>"
                + "".join(
                    f"<tr><td>{esc(p['probe'])}</td><td>{esc(p['status'])} "
                    f"{esc(p.get('error', ''))}</td><td>{_num(p.get('seconds'), 1)} s"
                    "</td></tr>"
                    for p in probes
                )
                + "</table>"
            )
            for p in probes:
                if p["status"] != "ok":
                    continue
                sec = _load(rd / "probes" / p["probe"] / "section.json")
                if sec:
                    body.append(
                        f"<h3>{esc(sec.get('title', p['probe']))}</h3>"
                        + _rewrite_src(sec.get("html", ""), f"{rel}probes/")
                    )
    page = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<title>Zeiler &amp; Fergus reproduction</title>"
        f"<style>{_CSS}</style></head><body>" + "\n".join(body) + "</body></html>\n"
    )
    write_json(
        out / "report" / "report.json",
        {"recipe": recipe, "table2": t2, "table3": t3, "ensembles": ens, "runs": record_runs},
    )
    return write_text(out / "report" / "index.html", page)
