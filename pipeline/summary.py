"""What a run reports: per-stage progress while it runs, the result, the summary written to ``latest.json``, and the
totals of a stage folder's commit markers (``status``, ``view``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .keyed import read_unit_markers, table_dir
from .latest import relative_to_output
from .plan import RunPlan
from .shards import read_markers


@dataclass
class StageProgress:
    name: str
    total: int
    done: int = 0
    processed_now: int = 0  # shards processed in this run (not reused)
    records_now: int = 0
    started: float | None = None
    finished: float | None = None  # when its last shard of this run came back (its rate ends there)
    failed: list[tuple[int, str]] = field(default_factory=list)
    units_total: int = 0  # keyed stages: units of the keyed table (keyed.py), and how many are committed
    units_done: int = 0
    retried: list[tuple[int, str]] = field(default_factory=list)  # failed tries that were retried (crash, timeout)
    healed: list[tuple[int, str]] = field(default_factory=list)  # damaged shards found and redone
    repaired_now: int = 0  # committed shards repaired (their transient errors redone) in this run
    records_redone: int = 0

    @property
    def records_per_s(self) -> float:
        if not self.started or not self.records_now:
            return 0.0
        end = self.finished if self.finished is not None else time.perf_counter()
        return self.records_now / max(end - self.started, 1e-9)


@dataclass
class RunResult:
    run_id: str
    plan: RunPlan
    stages: dict[str, StageProgress]
    ingest: dict[str, Any]
    seconds: float
    dataset: dict[str, int] | None = None  # records per published split (publish), when the run published
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)  # per stage: its Stage.after_run entry
    problems: list[str] = field(default_factory=list)  # why the output is not worth keeping (health.run_problems)

    @property
    def failed(self) -> list[tuple[str, int, str]]:
        return [(name, shard, err) for name, sp in self.stages.items() for shard, err in sp.failed]

    @property
    def ok(self) -> bool:
        """Every shard committed and the share of records in error within ``run.max_error_share``."""
        return not self.failed and not self.problems


def run_summary(result: RunResult) -> dict[str, Any]:
    plan = result.plan

    def rel(folder: Path) -> str:  # folders inside the output folder are relative to it (latest.py)
        return relative_to_output(plan.output_dir, folder)

    chain = [{"stage": "ingest", "key": plan.ingest.key, "dir": rel(plan.ingest.dir)}]
    chain += [{"stage": s.name, "key": s.key, "dir": rel(s.dir), "version": s.cls.version} for s in plan.stages]
    return {
        "run_id": result.run_id,
        "seconds": round(result.seconds, 3),
        "ok": result.ok,
        "problems": result.problems,
        "chain": chain,
        "final_dir": rel(plan.final_dir),
        "ingest": result.ingest,
        "stages": {name: {"shards_total": sp.total, "shards_done": sp.done, "shards_processed_now": sp.processed_now,
                          "records_processed_now": sp.records_now, "records_per_s": round(sp.records_per_s, 2),
                          "failed": sp.failed, "retried": sp.retried, "healed": sp.healed,
                          "shards_repaired_now": sp.repaired_now, "records_redone_now": sp.records_redone,
                          **({"table_units": [sp.units_done, sp.units_total]} if sp.units_total else {})}
                   for name, sp in result.stages.items()},
        **({"dataset": result.dataset} if result.dataset is not None else {}),
        **({"reports": result.reports} if result.reports else {}),
    }


def llm_totals(markers: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per LLM role, the requests, retries, failovers, errors... of a stage's workers: each marker holds its worker's
    running totals when it committed, so the last marker of each worker (host, pid) counts. A worker killed after
    its last commit took its latest requests with it: these are lower bounds."""
    last: dict[tuple[Any, Any], dict[str, Any]] = {}
    for m in markers:
        key = (m.get("host"), m.get("pid"))
        if m.get("llm") and (key not in last or m.get("finished_at", 0) >= last[key].get("finished_at", 0)):
            last[key] = m
    out: dict[str, dict[str, Any]] = {}
    for m in last.values():
        for role, stats in m["llm"].items():
            mine = out.setdefault(role, {})
            for k, v in stats.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    mine[k] = mine.get(k, 0) + v
                elif isinstance(v, dict):
                    into = mine.setdefault(k, {})
                    for kk, vv in v.items():
                        into[kk] = into.get(kk, 0) + vv
    return out


def stage_totals(stage_dir: Path) -> dict[str, Any]:
    """Sum the commit markers of a stage folder's committed shards (for status and summaries); a keyed stage's
    table units add their keys, seconds and counters (what was computed once per key is counted there)."""
    totals: dict[str, Any] = {"shards": 0, "records_in": 0, "records_ok": 0, "records_dropped": 0,
                              "records_error": 0, "drop_reasons": {}, "errors_by_stage": {}, "counters": {},
                              "seconds": 0.0, "table_units": 0, "table_keys": 0}
    units = read_unit_markers(table_dir(stage_dir))
    markers = read_markers(stage_dir)
    # a worker's running LLM totals are in whichever of its markers came last: a table unit's or a shard's
    totals["llm"] = llm_totals([*units.values(), *markers.values()])
    for stats in units.values():
        totals["table_units"] += 1
        totals["table_keys"] += stats.get("keys", 0)
        totals["seconds"] += stats.get("seconds", 0.0) or 0.0
        for reason, n in (stats.get("counters") or {}).items():
            totals["counters"][reason] = totals["counters"].get(reason, 0) + n
    for stats in markers.values():
        totals["shards"] += 1
        for k in ("records_in", "records_ok", "records_dropped", "records_error"):
            totals[k] += stats.get(k, 0)
        totals["seconds"] += stats.get("seconds", 0.0) or 0.0
        for group in ("drop_reasons", "errors_by_stage", "counters"):
            for reason, n in (stats.get(group) or {}).items():
                totals[group][reason] = totals[group].get(reason, 0) + n
    return totals
