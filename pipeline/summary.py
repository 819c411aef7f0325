"""What a run reports: per-stage progress while it runs, the result, the summary written to ``latest.json``, and the
totals of a stage folder's commit markers (``status``, ``view``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .keyed import read_unit_markers, table_dir
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

    @property
    def failed(self) -> list[tuple[str, int, str]]:
        return [(name, shard, err) for name, sp in self.stages.items() for shard, err in sp.failed]

    @property
    def ok(self) -> bool:
        return not self.failed


def run_summary(result: RunResult) -> dict[str, Any]:
    plan = result.plan
    chain = [{"stage": "ingest", "key": plan.ingest.key, "dir": str(plan.ingest.dir)}]
    chain += [{"stage": s.name, "key": s.key, "dir": str(s.dir), "version": s.cls.version} for s in plan.stages]
    return {
        "run_id": result.run_id,
        "seconds": round(result.seconds, 3),
        "ok": result.ok,
        "chain": chain,
        "final_dir": str(plan.final_dir),
        "ingest": result.ingest,
        "stages": {name: {"shards_total": sp.total, "shards_done": sp.done, "shards_processed_now": sp.processed_now,
                          "records_processed_now": sp.records_now, "records_per_s": round(sp.records_per_s, 2),
                          "failed": sp.failed, **({"table_units": [sp.units_done, sp.units_total]}
                                                   if sp.units_total else {})}
                   for name, sp in result.stages.items()},
        **({"dataset": result.dataset} if result.dataset is not None else {}),
        **({"reports": result.reports} if result.reports else {}),
    }


def stage_totals(stage_dir: Path) -> dict[str, Any]:
    """Sum the commit markers of a stage folder's committed shards (for status and summaries); a keyed stage's
    table units add their keys, seconds and counters (what was computed once per key is counted there)."""
    totals: dict[str, Any] = {"shards": 0, "records_in": 0, "records_ok": 0, "records_dropped": 0,
                              "records_error": 0, "drop_reasons": {}, "errors_by_stage": {}, "counters": {},
                              "seconds": 0.0, "table_units": 0, "table_keys": 0}
    for stats in read_unit_markers(table_dir(stage_dir)).values():
        totals["table_units"] += 1
        totals["table_keys"] += stats.get("keys", 0)
        totals["seconds"] += stats.get("seconds", 0.0) or 0.0
        for reason, n in (stats.get("counters") or {}).items():
            totals["counters"][reason] = totals["counters"].get(reason, 0) + n
    for stats in read_markers(stage_dir).values():
        totals["shards"] += 1
        for k in ("records_in", "records_ok", "records_dropped", "records_error"):
            totals[k] += stats.get(k, 0)
        totals["seconds"] += stats.get("seconds", 0.0) or 0.0
        for group in ("drop_reasons", "errors_by_stage", "counters"):
            for reason, n in (stats.get(group) or {}).items():
                totals[group][reason] = totals[group].get(reason, 0) + n
    return totals
