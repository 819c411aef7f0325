"""Stage 0: read the configured source into fixed-size record shards under ``<output>/ingest/<key>``.

Ingest runs in the driver: it is I/O-light (annotations, image headers) and its output defines the shards that every
later stage maps one to one. It is keyed like a stage and skipped when complete: ``_complete.json`` lists the shards,
and each of them must still be committed and intact (``shards.check_shard``). A damaged or missing ingest shard is
rewritten from the source (the key fingerprints the source, so the records are the same), and the stages' shards made
from the old one are voided by the scheduler (their ``input_commit`` no longer matches). Intact shards are never
rewritten, so an ingest killed half-way resumes where it stopped.
"""

from __future__ import annotations

import logging
import time
from itertools import islice
from pathlib import Path
from typing import Any, Iterator

from .dataset_card import write_dataset_card
from .ingest import check_source, read_source, source_splits
from .plan import IngestPlan
from .shards import MANIFEST, commit_shard, is_committed, read_json, shard_path, shard_problem, void_shard, \
    write_json_atomic, write_records
from .worker import shard_stats

log = logging.getLogger(__name__)

COMPLETE = "_complete.json"


class IngestStopped(RuntimeError):
    """Ingest was asked to stop (the run is ending: Ctrl-C, or Ray failed to start beside it)."""


class EmptySplitError(ValueError):
    """A configured split yielded no records and the source says that is an error (``empty_split: error``)."""


def empty_split_warnings(source_config: Any, records_by_split: dict[str, int]) -> list[str]:
    """One warning per configured split that yielded no records (a wrong file, or a filter that removed all)."""
    return [f"split {split!r} of source {getattr(source_config, 'name', source_config.kind)!r} yielded no records; "
            "check the file, or remove the split from the config"
            for split in source_splits(source_config) if not records_by_split.get(split)]


def _chunks(it: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    while chunk := list(islice(it, size)):
        yield chunk


def ingest_complete(plan: IngestPlan) -> dict[str, Any] | None:
    """The completion record when ingest is done and every shard it lists is committed and intact, else None."""
    summary = _completion(plan)
    if summary is None or any(shard_problem(plan.dir, i) for i in range(summary["num_shards"])):
        return None
    return summary


def _completion(plan: IngestPlan) -> dict[str, Any] | None:
    try:
        summary = read_json(plan.dir / COMPLETE)
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and isinstance(summary.get("num_shards"), int) else None


def run_ingest(plan: IngestPlan, source_config: Any, cache_dir: Path, run_id: str,
               stop: Any | None = None) -> dict[str, Any]:
    """Write the ingest shards that are not committed and intact (none, when ingest is complete). Returns the
    completion record (num_shards, counts). ``stop``: an event that, once set, makes ingest stop between shards."""
    done = plan.dir / COMPLETE
    previous = _completion(plan)
    if previous is not None:
        damaged = {i: p for i in range(previous["num_shards"]) if (p := shard_problem(plan.dir, i))}
        if not damaged:
            return previous
        for index, problem in sorted(damaged.items()):
            log.warning("ingest shard %d is not committed (%s); rewriting it from the source", index, problem)
    check_source(source_config)
    plan.dir.mkdir(parents=True, exist_ok=True)
    manifest = {"stage": "ingest", "key": plan.key, "source": plan.source, "shard_size": plan.shard_size}
    write_json_atomic(plan.dir / MANIFEST, manifest)
    write_dataset_card(plan.dir, manifest)
    t0 = time.perf_counter()
    totals = {"records_in": 0, "records_ok": 0, "records_error": 0}
    n_shards = written = 0
    seen: set[str] = set()
    by_split: dict[str, int] = {}
    for index, records in enumerate(_chunks(read_source(source_config, cache_dir), plan.shard_size)):
        if stop is not None and stop.is_set():
            raise IngestStopped("ingest stopped before it finished; rerun the same command to resume")
        for rec in records:
            if rec["id"] in seen:  # readers make ids unique; this guards the exactly-once promise itself
                raise RuntimeError(f"ingest produced the id {rec['id']!r} twice; ids must be unique per source")
            seen.add(rec["id"])
            by_split[rec["split"]] = by_split.get(rec["split"], 0) + 1
        stats = shard_stats(records, "ingest")
        stats.update(stage="ingest", stage_key=plan.key, run_id=run_id, shard=index)
        if not is_committed(plan.dir, index):  # an intact shard of this key holds these very records
            void_shard(plan.dir, index)
            write_records(shard_path(plan.dir, index), records)
            commit_shard(plan.dir, index, stats)
            written += 1
        for k in totals:
            totals[k] += stats[k]
        n_shards = index + 1
    warnings = empty_split_warnings(source_config, by_split)
    if warnings and getattr(source_config, "empty_split", "warn") == "error":
        # no completion file: once the source is fixed (its fingerprint changes) or the flag lifted, ingest reruns
        raise EmptySplitError("; ".join(warnings) + " (source.empty_split=error)")
    summary = {"num_shards": n_shards, **totals, "records_by_split": by_split, "warnings": warnings,
               "seconds": round(time.perf_counter() - t0, 3), "key": plan.key, "shards_written": written}
    write_json_atomic(done, summary)
    log.debug("ingest: %d records in %d shards (%d with errors, %d written)", totals["records_in"], n_shards,
              totals["records_error"], written)
    return summary
