"""Whether a finished run's output is worth keeping: the share of records that ended in error, with the reason.

A run whose shards all committed can still be useless: a missing image folder or a dead endpoint turns every record
into ``status: error``, each counted, none lost, and the run "succeeds". ``run_problems`` reads the commit markers of
the last stage (cheap: no shard is opened unless there is a problem to explain) and says when the error share is above
``run.max_error_share``, quoting the first error so the user sees the cause without opening a shard.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from .schema import STATUS_ERROR, SchemaMismatch
from .shards import committed_shards, read_markers, read_table


def error_totals(stage_dir: Path) -> tuple[int, int, dict[str, int]]:
    """(records, records in error, errors by the stage that raised them) over a stage folder's commit markers."""
    records = errors = 0
    by_stage: dict[str, int] = {}
    for stats in read_markers(stage_dir).values():
        records += stats.get("records_in", 0)
        errors += stats.get("records_error", 0)
        for stage, n in (stats.get("errors_by_stage") or {}).items():
            by_stage[stage] = by_stage.get(stage, 0) + n
    return records, errors, by_stage


def first_error(stage_dir: Path) -> str | None:
    """The message of the first record in error in a stage folder (shards in order), or None."""
    for path in committed_shards(stage_dir):
        try:
            table = read_table(path, columns=["status", "error", "error_stage"])  # a local file or an object
        except (OSError, ValueError, SchemaMismatch):
            continue
        hit = table.filter(pc.equal(table.column("status"), STATUS_ERROR))
        if hit.num_rows:
            row = hit.slice(0, 1).to_pylist()[0]
            return f"[{row['error_stage']}] {row['error']}"
    return None


def error_share_problem(stage_dir: Path, max_share: float) -> str | None:
    """A one-paragraph reason when more than ``max_share`` of the stage's records are errors, else None."""
    records, errors, by_stage = error_totals(stage_dir)
    if not records or errors / records <= max_share:
        return None
    stages = ", ".join(f"{k}: {v}" for k, v in sorted(by_stage.items(), key=lambda kv: -kv[1]))
    example = first_error(stage_dir)
    text = (f"{errors} of {records} records ({errors / records:.0%}) ended in error, more than "
            f"run.max_error_share={max_share:g} allows (errors by stage: {stages or '-'})")
    if example:
        text += f"; first error: {example[:600]}"
    return text + ". Fix the cause and rerun, or raise run.max_error_share to keep such a run"


def run_problems(result: Any, max_share: float) -> list[str]:
    """What makes a finished run fail besides failed shards: too many records in error."""
    problem = error_share_problem(result.plan.final_dir, max_share)
    return [problem] if problem else []
