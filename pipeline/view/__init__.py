"""``gmner-pipeline view``: an HTML page of a run's records that a person can work with.

The page (default ``<output>/view/index.html``) holds a small index of EVERY record (what the filters read: status,
drop reason, chain styles and teachers, GRPO keep/drop and drop rule, D1/D2) and the stage counts; the records' details sit beside
it in ``<page>_files/records-NNNNN.js`` (``chunk_size`` records each) and are loaded only for the page of results on
screen, so ~10k records stay quick (measured figures in docs/view.md). Images are JPEG thumbnails in
``<page>_files/img/``; boxes (gold: green, detector: blue) are drawn over them by the page from original pixels.
It works from ``file://``: no server, no network, no library.
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any, Callable

from ..latest import require_stage_dirs
from ..report import load_latest, stage_entry
from ..shards import iter_committed_records
from ..summary import stage_totals
from .payload import detail, index_entry
from .thumbs import write_thumb

PAGE_SIZE = 25
CHUNK_SIZE = 200

__all__ = ["ViewResult", "write_view"]


@dataclass
class ViewResult:
    page: Path
    records: int
    images: int
    bytes: int  # the page and everything beside it


def _script_json(value: Any) -> str:
    """JSON that is safe inside a <script> element."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")


def _asset(name: str) -> str:
    return files("gmner_pipeline.view").joinpath("assets", name).read_text(encoding="utf-8")


def _counts_table(output_dir: Path, chain: list[dict[str, Any]]) -> str:
    e = html.escape
    rows = []
    for c in chain:
        t = stage_totals(output_dir / c["stage"] / c["key"])
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(t["drop_reasons"].items(), key=lambda kv: -kv[1])) or "-"
        rows.append(f"<tr><td>{e(c['stage'])}</td><td>{t['records_in']}</td><td>{t['records_ok']}</td>"
                    f"<td>{t['records_dropped']}</td><td>{t['records_error']}</td><td>{e(reasons)}</td></tr>")
    return ("<table id='stages'><tr><th>stage</th><th>records in</th><th>ok</th><th>dropped</th><th>errors</th>"
            f"<th>drops by reason</th></tr>{''.join(rows)}</table>")


# beside the records, what else a person looking at the run may want: the dataset card and the filter report
RUN_FILES = (("dataset card (README.md)", "README.md"), ("GRPO filter report", "reports/grpo_filter.png"))


def _links(output_dir: Path, page_dir: Path) -> str:
    found = [(label, os.path.relpath(output_dir / rel, page_dir)) for label, rel in RUN_FILES
             if (output_dir / rel).exists()]
    if not found:
        return ""
    return "<p class='links'>" + "".join(f"<a href='{html.escape(Path(href).as_posix())}'>{html.escape(label)}</a>"
                                         for label, href in found) + "</p>"


def write_view(output_dir: str | Path, target: str | Path | None = None, stage: str | None = None,
               limit: int | None = None, *, page_size: int = PAGE_SIZE, chunk_size: int = CHUNK_SIZE,
               on_record: Callable[[int], None] | None = None) -> ViewResult:
    """Write the page for the last run in ``output_dir`` (records as ``stage`` wrote them, default its last stage;
    the first ``limit`` records, default all)."""
    out = Path(output_dir)
    latest = load_latest(out)
    entry = stage_entry(latest, stage)
    require_stage_dirs(out, latest)  # the counts table reads every stage folder: name the missing ones
    page = Path(target) if target else out / "view" / "index.html"
    assets = page.parent / f"{page.stem}_files"
    for old in assets.glob("records-*.js"):
        old.unlink()
    assets.mkdir(parents=True, exist_ok=True)
    index: list[dict[str, Any]] = []
    chunk: list[dict[str, Any]] = []
    images = 0

    def flush() -> None:
        n = (len(index) - 1) // chunk_size
        (assets / f"records-{n:05d}.js").write_text(f"gmnerChunk({n},{_script_json(chunk)});\n", encoding="utf-8")
        chunk.clear()

    for rec in iter_committed_records(out / entry["stage"] / entry["key"]):
        if limit is not None and len(index) >= limit:
            break
        thumb = write_thumb(rec, assets / "img")
        images += thumb is not None
        index.append(index_entry(len(index), rec, thumb is not None))
        chunk.append(detail(rec, thumb))
        if len(chunk) == chunk_size:
            flush()
        if on_record:
            on_record(len(index))
    if chunk:
        flush()
    meta = {"assets": assets.name, "page_size": page_size, "chunk_size": chunk_size, "stage": entry["stage"],
            "records": len(index)}
    e = html.escape
    name = out.resolve().name
    page.write_text(
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>gmner-pipeline: {e(name)}</title><style>{_asset('view.css')}</style></head><body>"
        f"<header><h1>gmner-pipeline: {e(name)}</h1>"
        f"<p>{len(index)} records as stage <b>{e(entry['stage'])}</b> wrote them. Green: gold boxes; blue (dashed): "
        f"detector boxes. Chains open on click.</p>{_links(out, page.parent)}{_counts_table(out, latest['chain'])}"
        "</header>"
        "<div id='filters'></div>"
        "<div class='nav'><button class='prev'>previous</button><span class='pageinfo'></span>"
        "<button class='next'>next</button></div>"
        "<main id='records' data-state='loading'></main>"
        "<div class='nav'><button class='prev'>previous</button><span class='pageinfo'></span>"
        "<button class='next'>next</button></div>"
        f"<script type='application/json' id='gmner-meta'>{_script_json(meta)}</script>"
        f"<script type='application/json' id='gmner-index'>{_script_json(index)}</script>"
        f"<script>{_asset('view.js')}</script></body></html>\n", encoding="utf-8")
    size = page.stat().st_size + sum(p.stat().st_size for p in assets.rglob("*") if p.is_file())
    return ViewResult(page, len(index), images, size)
