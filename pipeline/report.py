"""What people look at: the end-of-run summary, ``status`` of an output folder, and ``show`` of one record."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
from rich import box
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .summary import RunResult, stage_totals
from .answer import format_box
from .latest import OutputNotFound, load_latest, require_stage_dirs
from .shards import iter_committed_tables
from .storage import location

__all__ = ["OutputNotFound", "RecordNotFound", "StageNotInRun", "find_record", "list_ids", "load_latest",
           "print_record", "record_view", "run_notes", "stage_entry", "status_table", "summary_table"]


class _Message(KeyError):
    def __str__(self) -> str:  # a KeyError would print its message quoted
        return str(self.args[0]) if self.args else ""


class StageNotInRun(_Message):
    """A ``--stage`` that the last run did not have (the message lists those it had)."""


class RecordNotFound(_Message):
    """No record with that id (the message suggests close ids and ``gmner-pipeline ids``)."""


def stage_entry(latest: dict[str, Any], stage: str | None) -> dict[str, Any]:
    """The chain entry of ``stage`` in the last run (default: its last stage)."""
    chain = latest["chain"]
    if stage is None:
        return chain[-1]
    for entry in chain:
        if entry["stage"] == stage:
            return entry
    raise StageNotInRun(f"stage {stage!r} is not in the last run; its stages: {[e['stage'] for e in chain]}")


def list_ids(output_dir: str | Path, stage: str | None = None, status: str | None = None,
             limit: int | None = None) -> tuple[list[dict[str, Any]], int]:
    """Up to ``limit`` records (id, status, drop reason, error stage, text) of a stage's committed output, in shard
    order, and how many match in all."""
    if status is not None and status not in ("ok", "dropped", "error"):
        raise ValueError(f"--status {status!r}: use ok, dropped or error")
    latest = load_latest(output_dir)
    entry = stage_entry(latest, stage)
    require_stage_dirs(output_dir, latest, [entry["stage"]])
    rows: list[dict[str, Any]] = []
    total = 0
    for _, table in iter_committed_tables(entry["dir"], ["id", "status", "drop_reason", "error_stage", "text"]):
        if status is not None:
            table = table.filter(pc.equal(table.column("status"), status))
        total += table.num_rows
        if limit is None or len(rows) < limit:
            rows += table.slice(0, None if limit is None else limit - len(rows)).to_pylist()
    return rows, total


def _reasons(counts: dict[str, int]) -> Text:
    """Counts as one cell, most frequent first. A ``Text``: names such as ``llm:chains:`` must not be read as rich
    markup or emoji codes (``:chains:`` would print a chain symbol)."""
    return Text(", ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])) or "-")


def status_table(output_dir: str | Path) -> Table:
    latest = load_latest(output_dir)
    require_stage_dirs(output_dir, latest)
    table = Table(title=f"{output_dir}  (run {latest['run_id']})", title_justify="left")
    for col in ("stage", "key", "shards", "records in", "ok", "dropped", "errors", "drops by reason",
                "errors by stage", "stage counters", "llm"):
        table.add_column(col, overflow="fold",
                         justify="right" if col in {"shards", "records in", "ok", "dropped", "errors"} else "left")
    total_shards = latest["ingest"]["num_shards"]
    for entry in latest["chain"]:
        t = stage_totals(location(entry["dir"]))
        table.add_row(entry["stage"], entry["key"][:10], f"{t['shards']}/{total_shards}", str(t["records_in"]),
                      str(t["records_ok"]), str(t["records_dropped"]), str(t["records_error"]),
                      _reasons(t["drop_reasons"]), _reasons(t["errors_by_stage"]), _reasons(t["counters"]),
                      _llm(t.get("llm") or {}))
    return table


def _llm(totals: dict[str, dict[str, Any]]) -> str:
    """Per role: requests, retries, failovers and failed requests of the stage's workers (summary.llm_totals)."""
    return "; ".join(f"{role}: {t.get('requests', 0)} requests, {t.get('retries', 0)} retries, "
                     f"{t.get('failovers', 0)} failovers, {sum((t.get('errors') or {}).values())} failed"
                     for role, t in sorted(totals.items())) or "-"


def summary_table(result: RunResult) -> Group:
    """The end-of-run summary: one narrow row of numbers per stage (it fits 80 columns, the width of a CI log), then a
    line per stage with its drops and errors by reason and its counters, which would be unreadable folded into a cell.
    ``s`` is the stage's worker time summed over its shards (what it cost, reused shards included); ``calls`` and
    ``tokens`` are its LLM requests and their prompt + completion tokens."""
    table = Table(title=f"run {result.run_id}: {result.seconds:.1f} s", title_justify="left", box=box.SIMPLE_HEAD,
                  pad_edge=False, collapse_padding=True)
    for col in ("stage", "shards", "reused", "in", "ok", "drop", "err", "rec/s", "s", "calls", "tokens"):
        table.add_column(col, no_wrap=True, justify="left" if col == "stage" else "right")
    ing = result.ingest
    table.add_row("ingest", f"{ing['num_shards']}/{ing['num_shards']}", "", str(ing["records_in"]),
                  str(ing["records_ok"]), "0", str(ing["records_error"]), "", "", "", "")
    details = []
    for s in result.plan.stages:
        sp = result.stages[s.name]
        t = stage_totals(s.dir)
        llm = t.get("llm") or {}
        calls = sum(r.get("requests", 0) for r in llm.values())
        tokens = sum(r.get("prompt_tokens", 0) + r.get("completion_tokens", 0) for r in llm.values())
        table.add_row(s.name, f"{sp.done}/{sp.total}", str(sp.done - sp.processed_now), str(t["records_in"]),
                      str(t["records_ok"]), str(t["records_dropped"]), str(t["records_error"]),
                      f"{sp.records_per_s:.1f}" if sp.processed_now else "-", f"{t['seconds']:.1f}",
                      f"{calls:,}" if llm else "", f"{tokens:,}" if llm else "")
        parts = [(label, t[group]) for label, group in (("drops", "drop_reasons"), ("errors", "errors_by_stage"),
                                                         ("counters", "counters")) if t[group]]
        if parts:
            line = Text(f"{s.name}: ", style="bold")
            line.append(" | ".join(f"{label} " + ", ".join(f"{k} {v}" for k, v in sorted(
                counts.items(), key=lambda kv: (-kv[1], kv[0]))) for label, counts in parts))
            details.append(line)
    return Group(table, *details, *_reuse_note(result))


def _reuse_note(result: RunResult) -> list[Text]:
    """Why a rerun's row can show calls it did not make: ``s``, ``calls`` and ``tokens`` are the output's cost."""
    progress = list(result.stages.values())
    reused = sum(sp.done - sp.processed_now for sp in progress)
    if not reused:
        return []
    if not any(sp.processed_now or sp.repaired_now for sp in progress):
        return [Text("every shard was reused, none computed: s, calls and tokens are what the output cost when it "
                     "was made", style="dim")]
    return [Text(f"s, calls and tokens count the {reused} reused shard(s) too (what the output cost)", style="dim")]


def run_notes(result: RunResult) -> list[str]:
    """What a run did besides its work, one line each: damaged shards redone, shards retried (crashes, timeouts),
    committed shards repaired (transient errors redone)."""
    notes = []
    for name, sp in result.stages.items():
        notes += [f"{name} shard {shard} was damaged ({why}): redone" for shard, why in sp.healed]
        notes += [f"{name} shard {shard} retried after: {why}" for shard, why in sp.retried]
        if sp.repaired_now:
            notes.append(f"{name}: {sp.repaired_now} committed shard(s) repaired, {sp.records_redone} record(s) "
                         "redone (errors of kind transient, run.redo_errors)")
    return notes


def find_record(output_dir: str | Path, record_id: str, stage: str | None = None) -> dict[str, Any]:
    latest = load_latest(output_dir)
    entries = [stage_entry(latest, stage)] if stage else list(reversed(latest["chain"]))
    require_stage_dirs(output_dir, latest, [e["stage"] for e in entries])
    for entry in entries:
        for path, table in iter_committed_tables(entry["dir"]):
            hit = table.filter(pc.equal(table.column("id"), record_id))
            if hit.num_rows:
                rec = hit.to_pylist()[0]
                rec["_stage"] = entry["stage"]
                rec["_shard"] = str(path)
                return rec
    ids = [i for _, t in iter_committed_tables(entries[0]["dir"], ["id"]) for i in t.column("id").to_pylist()]
    close = difflib.get_close_matches(record_id, ids, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else (f"; ids here look like {ids[0]}" if ids else "")
    raise RecordNotFound(f"no record with id {record_id!r} in {output_dir}{hint} (list them: gmner-pipeline ids "
                         f"{output_dir})")


def record_view(rec: dict[str, Any]) -> Group:
    parts: list[Any] = []
    head = Text()
    head.append(f"{rec['id']}", style="bold")
    head.append(f"   stage {rec.get('_stage')}   status ")
    head.append(rec["status"], style={"ok": "green", "dropped": "yellow", "error": "red"}.get(rec["status"], ""))
    if rec.get("drop_reason"):
        head.append(f" ({rec['drop_reason']})")
    parts.append(head)
    parts.append(Text(rec.get("text") or "", style="italic"))
    if rec.get("error"):
        parts.append(Text(f"error [{rec.get('error_stage')}]: {rec['error']}", style="red"))
    img = rec.get("image") or {}
    if img:
        parts.append(Text(f"image: {img.get('path') or img.get('uri')}  {img.get('width')}x{img.get('height')}  "
                          f"grounding labels: {rec.get('grounding_labels')}"))
    ents = Table("entity", "type", "fine type", "tokens", "boxes", title="entities", title_justify="left")
    for e in rec.get("entities") or []:
        boxes = " ".join(format_box(b) for b in e.get("boxes") or []) or (
            "not visible" if rec.get("grounding_labels") == "present" else "unknown")
        ents.add_row(e["text"], e["type"], e.get("fine_type") or "", f"{e['start']}:{e['end']}", boxes)
    parts.append(ents)
    if rec.get("retrieval"):
        r = rec["retrieval"]
        parts.append(Text(f"retrieval: query {r.get('query')!r}, chosen score {r.get('chosen_score')}, "
                          f"alpha {r.get('alpha')}, model {r.get('model_id')}"))
    if rec.get("detections"):
        d = rec["detections"]
        parts.append(Text(f"detections ({d.get('backend')}, {d.get('model_id')}): {d.get('annotation_text')}"))
    for k in rec.get("knowledge") or []:
        parts.append(knowledge_view(k))
    cot = rec.get("cot") or {}
    if cot.get("skipped"):
        parts.append(Text(f"cot skipped: {cot['skipped']}", style="yellow"))
    for ch in cot.get("chains") or []:
        title = f"{ch['style']} / {ch['route']}" + (f" / {ch['model_id']}" if ch.get("model_id") else "")
        title += f"  consistent={ch.get('consistent')}" + ("  (held out)" if ch.get("heldout") else "")
        if ch.get("rejection"):
            title += f"  rejection={ch['rejection']}"
        parts.append(Panel(Text(f"{ch.get('think')}\n\nanswer: {ch.get('answer')}"), title=title, title_align="left"))
    if rec.get("grpo"):
        g = rec["grpo"]
        parts.append(Text(f"grpo: keep={g.get('keep')} reason={g.get('reason')} rewards={g.get('rewards')}"))
    lin = Table("stage", "version", "key", "run", "models", "prompt", title="lineage", title_justify="left")
    for entry in rec.get("lineage") or []:
        lin.add_row(entry["stage"], entry.get("stage_version") or "", (entry.get("stage_key") or "")[:10],
                    entry.get("run_id") or "", ", ".join(entry.get("model_ids") or []), entry.get("prompt_hash") or "")
    parts.append(lin)
    return Group(*parts)


def knowledge_view(k: dict[str, Any]) -> Panel:
    """One entity's knowledge: the summary, the voted aspects with their support, each generator's answer."""
    body: list[Any] = []
    fine = k.get("fine_type") or "-"
    if k.get("fine_type_support"):
        fine += f"  (proposed by {', '.join(k['fine_type_support'])})"
    body.append(Text(f"fine type: {fine}   status: {k.get('status') or '-'}   "
                     f"context: {k.get('context_id') or 'none'}   source: {k.get('entity_source') or '-'}"))
    body.append(Text(f"summary: {k.get('knowledge') or '-'}", style="bold"))
    if k.get("aspects"):
        vote = Table("aspect", "voted", "support", title="vote", title_justify="left")
        for a in k["aspects"]:
            vote.add_row(a["aspect"], a["text"], ", ".join(a.get("support") or []))
        body.append(vote)
    elif k.get("voted"):
        body.append(Text(f"voted: {k['voted']}"))
    if k.get("answers"):
        answers = Table("role", "model", "fine type", "answer", title="answers", title_justify="left")
        for a in k["answers"]:
            text = a.get("text") or ""
            answers.add_row(a.get("role") or "", a.get("model_id") or "", a.get("fine_type") or "",
                            (text[:400] + " ..." if len(text) > 400 else text) if a.get("ok") is not False
                            else Text(f"failed: {a.get('error')}", style="red"))
        body.append(answers)
    tokens: dict[str, int] = {}
    for t in k.get("tokens") or []:
        tokens[t["role"]] = tokens.get(t["role"], 0) + (t.get("prompt_tokens") or 0) + (t.get("completion_tokens") or 0)
    if tokens:
        body.append(Text("tokens: " + ", ".join(f"{r} {n}" for r, n in tokens.items())))
    for note in k.get("notes") or []:
        body.append(Text(f"note: {note}", style="yellow"))
    return Panel(Group(*body), title=f"knowledge: {k['entity'][:80]} ({k['type']})", title_align="left")


def print_record(rec: dict[str, Any], console: Console | None = None) -> None:
    (console or Console()).print(record_view(rec))
