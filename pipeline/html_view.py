"""A self-contained HTML page of a run's output: per-stage counts, and records with their image, gold boxes
(green), detector boxes (blue), knowledge and reasoning chains. For looking, where reading Parquet is no fun."""

from __future__ import annotations

import base64
import html
import io
from itertools import islice
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from .answer import format_box
from .latest import load_latest, require_stage_dirs
from .summary import stage_totals
from .shards import iter_committed_records
from .storage import location

THUMB = 480
CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}
.rec{border-top:2px solid #888;padding:1em 0;display:flex;gap:1.5em}.rec img{max-width:480px;border:1px solid #ccc}
.ok{color:#070}.dropped{color:#a60}.error{color:#b00}pre{white-space:pre-wrap;background:#f6f6f6;padding:.5em}
.gold{color:#0a0;font-weight:bold}.det{color:#06c}
"""


def _drawable(box: Any) -> bool:
    """Pillow raises on an inverted box; model output can hold one, and the page must still render."""
    return bool(box) and len(box) == 4 and box[2] >= box[0] and box[3] >= box[1]


def _thumbnail(rec: dict[str, Any]) -> str | None:
    path = (rec.get("image") or {}).get("path")
    if not path or not Path(path).is_file():
        return None
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            scale = min(1.0, THUMB / max(im.size))
            im = im.resize((max(1, int(im.width * scale)), max(1, int(im.height * scale))))
    except OSError:
        return None
    draw = ImageDraw.Draw(im)
    for det in (rec.get("detections") or {}).get("boxes") or []:
        if not _drawable(det["box"]):
            continue
        draw.rectangle([v * scale for v in det["box"]], outline=(0, 102, 204), width=2)
        draw.text((det["box"][0] * scale + 2, det["box"][1] * scale + 2), det["label"], fill=(0, 102, 204))
    for ent in rec.get("entities") or []:
        for box in ent.get("boxes") or []:
            if not _drawable(box):
                continue
            draw.rectangle([v * scale for v in box], outline=(0, 170, 0), width=3)
            draw.text((box[0] * scale + 3, box[3] * scale - 12), ent["text"], fill=(0, 170, 0))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _record_html(rec: dict[str, Any]) -> str:
    e = html.escape
    img = _thumbnail(rec)
    left = f'<img src="{img}">' if img else "<p><i>no image on disk</i></p>"
    def location(ent: dict[str, Any]) -> str:
        if ent.get("boxes"):
            return "<span class='gold'>" + e(" ".join(format_box(b) for b in ent["boxes"])) + "</span>"
        return "not visible" if rec.get("grounding_labels") == "present" else "<i>unknown</i>"

    rows = "".join(f"<tr><td>{e(x['text'])}</td><td>{e(x['type'])}</td><td>{e(x.get('fine_type') or '')}</td>"
                   f"<td>{location(x)}</td></tr>" for x in rec.get("entities") or [])
    parts = [f"<h3>{e(rec['id'])} <span class='{e(rec['status'])}'>{e(rec['status'])}"
             f"{' (' + e(rec['drop_reason']) + ')' if rec.get('drop_reason') else ''}</span></h3>",
             f"<p>{e(rec.get('text') or '')}</p>",
             f"<table><tr><th>entity</th><th>type</th><th>fine type</th><th>gold boxes</th></tr>{rows}</table>"]
    if rec.get("error"):
        parts.append(f"<p class='error'>{e(rec['error'])}</p>")
    det = rec.get("detections")
    if det:
        found = det.get("annotation_text") or "none above the score threshold"
        parts.append(f"<p class='det'>detections: {e(found)}</p>")
    for k in rec.get("knowledge") or []:
        parts.append(_knowledge_html(k))
    for ch in (rec.get("cot") or {}).get("chains") or []:
        parts.append(f"<details><summary>{e(ch['style'])} / {e(ch['route'])} — consistent: {ch.get('consistent')}"
                     f"</summary><pre>{e(ch.get('think') or '')}\n\nanswer: {e(ch.get('answer') or '')}</pre>"
                     "</details>")
    return f"<div class='rec'><div>{left}</div><div>{''.join(parts)}</div></div>"


def _knowledge_html(k: dict[str, Any]) -> str:
    """An entity's summary, then (folded) the voted aspects with their support and every generator's answer."""
    e = html.escape
    kind = k.get("fine_type") or k["type"]
    support = f" — fine type from {e(', '.join(k['fine_type_support']))}" if k.get("fine_type_support") else ""
    status = "" if (k.get("status") or "ok") == "ok" else f" <i>[{e(k['status'])}]</i>"
    rows = "".join(f"<tr><td>{e(a['aspect'])}</td><td>{e(a['text'])}</td><td>{e(', '.join(a.get('support') or []))}"
                   "</td></tr>" for a in k.get("aspects") or [])
    answers = "".join(f"<tr><td>{e(a.get('role') or '')}</td><td>{e(a.get('model_id') or '')}</td>"
                      f"<td>{e(a.get('fine_type') or '')}</td><td>"
                      + (e(a.get("text") or "") if a.get("ok") is not False
                         else f"<span class='error'>failed: {e(a.get('error') or '')}</span>")
                      + "</td></tr>" for a in k.get("answers") or [])
    notes = "".join(f"<li>{e(n)}</li>" for n in k.get("notes") or [])
    return (f"<p><b>{e(k['entity'])}</b> ({e(kind)}){status}: {e(k.get('knowledge') or '')}</p>"
            f"<details><summary>vote and answers{support}</summary>"
            + (f"<table><tr><th>aspect</th><th>voted</th><th>support</th></tr>{rows}</table>" if rows else "")
            + (f"<table><tr><th>role</th><th>model</th><th>fine type</th><th>answer</th></tr>{answers}</table>"
               if answers else "")
            + (f"<ul>{notes}</ul>" if notes else "") + "</details>")


def render_html(output_dir: str | Path, limit: int = 50, stage: str | None = None) -> str:
    latest = load_latest(output_dir)
    chain = latest["chain"]
    entry = next((c for c in chain if c["stage"] == stage), None) if stage else chain[-1]
    if entry is None:
        raise KeyError(f"stage {stage!r} is not in the last run; stages: {[c['stage'] for c in chain]}")
    require_stage_dirs(output_dir, latest)
    counts = []
    for c in chain:
        t = stage_totals(location(c["dir"]))
        reasons = ", ".join(f"{k}: {v}" for k, v in t["drop_reasons"].items()) or "-"
        counts.append(f"<tr><td>{html.escape(c['stage'])}</td><td>{t['shards']}</td><td>{t['records_in']}</td>"
                      f"<td>{t['records_ok']}</td><td>{t['records_dropped']}</td><td>{t['records_error']}</td>"
                      f"<td>{html.escape(reasons)}</td></tr>")
    body = "".join(_record_html(r) for r in islice(iter_committed_records(entry["dir"]), limit))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>gmner-pipeline {html.escape(str(output_dir))}"
            f"</title><style>{CSS}</style></head><body><h1>{html.escape(str(output_dir))}</h1>"
            f"<p>run {html.escape(latest['run_id'])}; records below from stage <b>{html.escape(entry['stage'])}</b> "
            f"(first {limit}). Green: gold boxes. Blue: detector boxes.</p>"
            "<table><tr><th>stage</th><th>shards</th><th>records in</th><th>ok</th><th>dropped</th><th>errors</th>"
            f"<th>drops by reason</th></tr>{''.join(counts)}</table>{body}</body></html>")


def write_html(output_dir: str | Path, target: str | Path | None = None, limit: int = 50,
               stage: str | None = None) -> Path:
    target = location(target) if target else location(output_dir) / "view.html"
    target.write_text(render_html(output_dir, limit, stage), encoding="utf-8")
    return target
