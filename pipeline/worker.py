"""Turning a Stage into shard work: read the input shard, run the stage batch by batch, write, commit.

Nothing here knows about Ray (the runner's executor wraps ``ShardProcessor`` in an actor), so it is tested as plain
Python, and ``gmner_pipeline.testing.run_stage`` uses the same three steps (``start_stage``, ``run_batch``,
``stop_stage``). The record contract holds for the whole run: every input record comes out once, with the same id. A
batch whose call raises is retried record by record, and a record whose call still raises comes out with
``status='error'`` and the exception in ``error`` rather than being lost or failing the shard. A stage that loses or
invents records (``StageContractError``) fails the shard: that is a bug to fix, not bad input.

While it works on a shard, a worker touches the shard's beat file after every batch (the driver's watchdog reads it)
and checks that its driver still holds the output folder's lock; it checks again right before it commits, so a worker
whose driver was killed commits nothing more (``output_lock.DriverGone``).

**Repairs** (``ShardTask.repair``): a committed shard is rewritten whole, but only some of its records run again: the
errors this stage marked ``transient`` (or all its errors, with ``run.redo_errors: all``), and the records that passed
through it untouched and whose input has since changed (an upstream stage repaired them). Every other record keeps its
committed result, so a rerun after an endpoint outage re-sends only what failed.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

from .keyed import (TableFiles, TableRef, collect_items, commit_unit, input_fingerprint, read_unit, unit_marker_path,
                    unit_path, value_error_kind, write_unit)
from .output_lock import DriverGone, ensure_driver_alive
from .schema import ERROR_TRANSIENT, STATUS_DROPPED, STATUS_ERROR, STATUS_OK
from .shards import (beat_path, check_commit, check_shard, commit_shard, marker_of, read_json, read_records,
                     shard_path, write_records)
from .stage import (Record, Stage, StageConfig, StageContext, StageContractError, active, check_contract,
                    error_kind_of, mark_error)
from .table_book import TableTask

log = logging.getLogger(__name__)

__all__ = ["Beat", "DriverGone", "ShardProcessor", "StageContractError", "check_contract", "records_to_redo",
           "run_batch", "shard_stats", "start_stage", "stop_stage", "table_items"]


def shard_stats(records: list[Record], stage: str) -> dict[str, Any]:
    """Counts for a commit marker: statuses, drop reasons, errors by the stage that raised them."""
    status = Counter(r.get("status") for r in records)
    drops = Counter(r.get("drop_reason") or "unspecified" for r in records if r.get("status") == STATUS_DROPPED)
    errors = Counter(r.get("error_stage") or "unknown" for r in records if r.get("status") == STATUS_ERROR)
    return {
        "records_in": len(records),
        "records_ok": status.get(STATUS_OK, 0),
        "records_dropped": status.get(STATUS_DROPPED, 0),
        "records_error": status.get(STATUS_ERROR, 0),
        "drop_reasons": dict(drops),
        "errors_by_stage": dict(errors),
        # drops and errors that THIS stage decided (the rest came from upstream)
        "new_drops": sum(1 for r in records if r.get("status") == STATUS_DROPPED and r.get("error_stage") == stage),
        "new_errors": sum(1 for r in records if r.get("status") == STATUS_ERROR and r.get("error_stage") == stage),
        # of those, the ones a rerun redoes by default (run.redo_errors)
        "new_errors_transient": sum(1 for r in records if r.get("status") == STATUS_ERROR
                                    and r.get("error_stage") == stage and r.get("error_kind") == ERROR_TRANSIENT),
    }


# --- the lifecycle of a stage in a worker: the one idiom ------------------------------------------------------------

def start_stage(stage_cls: type[Stage], config: StageConfig, context: StageContext) -> Stage:
    """Build the stage and run its ``setup()`` (once per worker process)."""
    stage = stage_cls(config, context)
    stage.setup()
    return stage


def stop_stage(stage: Stage) -> None:
    """The stage's ``close()``, then its LLM clients and event loop."""
    try:
        stage.close()
    finally:
        stage.llm.close()


def run_batch(stage: Stage, batch: list[Record]) -> list[Record]:
    """One batch through the stage; if it raises, record by record, and a record that still raises becomes an
    error record. Inputs are copied (one level), so a failed try cannot leave half-written results behind, and the
    counters a failed try added are taken back, so an event is counted once per record that keeps its result."""
    before = Counter(stage._counters)
    try:
        return stage([dict(r) for r in batch])
    except StageContractError:
        raise
    except Exception:  # noqa: BLE001 - isolate the failing record(s) below
        stage._counters = Counter(before)
        log.warning("stage %s failed on a batch of %d; retrying record by record", stage.name, len(batch),
                    exc_info=True)
    out = []
    for rec in batch:
        before = Counter(stage._counters)
        try:
            result = stage([dict(rec)])
            check_contract([rec], result, stage.name)
            out.append(result[0])
        except StageContractError:
            raise
        except Exception as exc:  # noqa: BLE001 - the record carries the error; the run goes on
            stage._counters = before
            stage.count("record_raised")
            tb = traceback.format_exception_only(type(exc), exc)[-1].strip()
            out.append(mark_error(dict(rec), stage.name, f"{stage.name} raised {tb}",
                                  transient=error_kind_of(exc) == ERROR_TRANSIENT))
    return out


def table_items(stage: Stage, records: Any, unit: int | None = None, units: int = 1) -> dict[str, dict[str, Any]]:
    """A keyed stage's ``{key: item}`` over ``records`` (the ok records it accepts), for one unit of the table or all
    of it (``keyed.collect_items`` picks each key's occurrence)."""
    return collect_items(stage.table_keys, (r for r in records if active(r) and stage.accepts(r)), unit, units)


def iter_input(stage: Stage, input_dir: str | Path, num_shards: int, beat: Any = None) -> Any:
    """The records of a stage's whole (committed) input, shard by shard, with only the columns the table pass needs
    (``beat``, when given, is called after each shard: the watchdog sees a long read progress)."""
    columns = None
    if stage.table_columns is not None:
        columns = list(dict.fromkeys(["id", "status", *stage.table_columns]))
    for index in range(num_shards):
        yield from read_records(shard_path(input_dir, index), columns)
        if beat is not None:
            beat()


def redo_value(value: Any, mode: str) -> bool:
    """A committed table value a repair computes again (``mode`` as ``run.redo_errors``)."""
    kind = value_error_kind(value)
    return kind is not None and (mode == "all" or (mode == "transient" and kind == ERROR_TRANSIENT))


def value_error_counts(values: dict[str, Any]) -> dict[str, int]:
    """A unit marker's error counts: the values that are errors (``keyed.value_error_kind``), and the transient ones
    (what a rerun repairs by default)."""
    kinds = [value_error_kind(v) for v in values.values()]
    return {"errors": sum(k is not None for k in kinds), "errors_transient": kinds.count(ERROR_TRANSIENT)}


def handled_by(record: Record, stage: str, stage_key: str) -> bool:
    """The stage worked on this record (it carries the stage's lineage entry, or the stage marked it)."""
    lineage = record.get("lineage") or []
    return record.get("error_stage") == stage or bool(lineage and lineage[-1].get("stage_key") == stage_key)


def records_to_redo(stage: str, stage_key: str, inputs: list[Record], committed: dict[str, Record],
                    mode: str) -> set[str]:
    """The ids a repair runs again: the stage's own errors (``mode``: ``transient`` ones, ``all``, or ``none``), and
    the records the stage passed through untouched whose input is no longer what it passed through."""
    redo = set()
    for rec in inputs:
        old = committed.get(rec["id"])
        if old is None:
            redo.add(rec["id"])
        elif old.get("status") == STATUS_ERROR and old.get("error_stage") == stage:
            if mode == "all" or (mode == "transient" and old.get("error_kind") == ERROR_TRANSIENT):
                redo.add(rec["id"])
        elif not handled_by(old, stage, stage_key) and old != rec:
            redo.add(rec["id"])
    return redo


def lock_to_check(context: StageContext) -> str | None:
    """The driver's lock, for a worker on the driver's host. Elsewhere the lock may live on a file system whose locks
    do not reach across hosts (an NFS mount with ``nolock``), where a worker would wrongly conclude its driver is gone;
    there, Ray ends a dead driver's workers itself."""
    if not context.lock_file or (context.driver_host and context.driver_host != socket.gethostname()):
        return None
    return context.lock_file


class Beat:
    """What a worker does between batches of a shard: touch the shard's beat file (the driver's watchdog reads its
    modification time) and stop if the driver is gone. ``check()`` runs once more right before the commit."""

    def __init__(self, out_dir: str | Path, index: int, lock_file: str | None):
        self.path = beat_path(out_dir, index)
        self.lock_file = lock_file

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_bytes(b"")

    def __call__(self) -> None:
        self.check()
        self.path.touch()  # a new mtime (in a bucket: the object written again)

    def check(self) -> None:
        ensure_driver_alive(self.lock_file)

    def stop(self) -> None:
        self.path.unlink(missing_ok=True)


class ShardProcessor:
    """One stage instance in a worker process: ``setup`` once, then shard after shard, then ``close``."""

    def __init__(self, stage_cls: type[Stage], config: StageConfig, context: StageContext):
        self.stage = start_stage(stage_cls, config, context)
        self.name = stage_cls.name
        self.batch_size = config.batch_size
        self.context = context

    def run(self, task: Any, extra_stats: dict[str, Any] | None = None, beat: Beat | None = None) -> dict[str, Any]:
        """Run a scheduler task (``scheduler.ShardTask`` or ``scheduler.TableTask``); returns its commit stats. The
        one entry point an executor needs."""
        if isinstance(task, TableTask):
            return self.build_unit(task.unit, task.table, task.input_dir, task.num_shards, extra_stats,
                                   repair=task.repair, beat=beat)
        return self.process(task.shard, task.in_path, task.out_dir, extra_stats, repair=task.repair, beat=beat,
                            table=task.table)

    def build_unit(self, unit: int, table: TableRef, input_dir: str | Path, num_shards: int,
                   extra_stats: dict[str, Any] | None = None, repair: str | None = None,
                   beat: Beat | None = None) -> dict[str, Any]:
        """Compute unit ``unit`` of a keyed stage's table from the stage's whole input; write it and commit it (its
        marker records the file and the input it was built from, like a shard's). ``repair``: the unit is committed
        and only its values whose error is to be redone (``transient`` ones, or ``all``) are computed again."""
        t0 = time.perf_counter()
        beat = beat or Beat(table.dir, unit, lock_to_check(self.context))
        beat.check()
        beat.start()
        try:
            self.stage.take_counters()
            items = table_items(self.stage, iter_input(self.stage, input_dir, num_shards, beat), unit, table.units)
            previous: dict[str, Any] | None = None
            kept: dict[str, Any] = {}
            if repair is not None:
                previous, problem = check_commit(unit_marker_path(table.dir, unit), unit_path(table.dir, unit), "keys")
                if previous is None:
                    raise RuntimeError(f"cannot repair unit {unit} of {table.dir}: {problem}")
                kept = {k: v for k, v in read_unit(table.dir, unit).items()
                        if k in items and not redo_value(v, repair)}
            values = {**kept, **self.stage.compute_table({k: v for k, v in items.items() if k not in kept})}
            beat()
            write_unit(table.dir, unit, values)
            stats = {"stage": self.name, "stage_key": self.context.stage_key, "run_id": self.context.run_id,
                     "unit": unit, "units": table.units, "keys": len(values),
                     **value_error_counts(values),
                     "seconds": round(time.perf_counter() - t0, 3), "host": socket.gethostname(), "pid": os.getpid(),
                     "finished_at": time.time(), **(extra_stats or {})}
            stats["counters"] = self.stage.take_counters()
            replaces: list[str] = []
            if previous is not None:
                stats["redone"] = len(values) - len(kept)
                stats["counters"] = dict(Counter(previous.get("counters") or {}) + Counter(stats["counters"]))
                replaces = [c for c in [*(previous.get("replaces") or []), previous.get("commit_id")] if c]
            llm = self.stage.llm.stats()
            if llm:
                stats["llm"] = llm
            beat.check()  # the driver is still there: commit
            return commit_unit(table.dir, unit, stats, input_commit=input_fingerprint(input_dir, num_shards),
                               replaces=replaces)
        finally:
            beat.stop()

    def process(self, index: int, in_path: str | Path, out_dir: str | Path,
                extra_stats: dict[str, Any] | None = None, repair: str | None = None,
                beat: Beat | None = None, table: TableRef | None = None) -> dict[str, Any]:
        """Process input shard ``index`` into ``out_dir`` (or repair the committed output shard, ``repair``: which
        errors to redo); returns the stats written to the commit marker. A keyed stage joins ``table`` (committed
        before its shards run)."""
        t0 = time.perf_counter()
        beat = beat or Beat(out_dir, index, lock_to_check(self.context))
        beat.check()
        beat.start()
        try:
            self.stage.take_counters()  # a shard that failed before on this worker left its counts behind
            if self.stage.keyed():
                if table is None:
                    raise ValueError(f"keyed stage {self.name} needs its table to process a shard")
                self.stage.attach_table(TableFiles(table))
            input_commit = _commit_id(marker_of(in_path))
            records = read_records(in_path)
            previous: dict[str, Any] | None = None
            if repair is not None:
                previous, committed = self._committed(out_dir, index)
                redo = records_to_redo(self.name, self.context.stage_key, records, committed, repair)
                todo = [r for r in records if r["id"] in redo]
            else:
                committed, todo = {}, records
            done: dict[str, Record] = {}
            for start in range(0, len(todo), self.batch_size):
                for rec in run_batch(self.stage, todo[start:start + self.batch_size]):
                    done[rec["id"]] = rec
                beat()
            out = [done.get(r["id"]) or committed[r["id"]] for r in records]
            check_contract(records, out, self.name)
            write_records(shard_path(out_dir, index), out)
            stats = shard_stats(out, self.name)
            stats.update(stage=self.name, stage_key=self.context.stage_key, run_id=self.context.run_id, shard=index,
                         seconds=round(time.perf_counter() - t0, 3), host=socket.gethostname(), pid=os.getpid(),
                         finished_at=time.time(), **(extra_stats or {}))
            stats["counters"] = self.stage.take_counters()
            replaces: list[str] = []
            if previous is not None:  # a repair: the first commit's counts stay, the repair's are added
                stats["redone"] = len(todo)
                stats["counters"] = dict(Counter(previous.get("counters") or {}) + Counter(stats["counters"]))
                replaces = [*(previous.get("replaces") or []), previous.get("commit_id")]
            llm = self.stage.llm.stats()
            if llm:
                stats["llm"] = llm  # running totals of this worker's clients, per role
            beat.check()  # the driver is still there: commit
            return commit_shard(out_dir, index, stats, input_commit=input_commit,
                                replaces=[c for c in replaces if c])
        finally:
            beat.stop()

    def _committed(self, out_dir: str | Path, index: int) -> tuple[dict[str, Any], dict[str, Record]]:
        marker, problem = check_shard(out_dir, index)
        if marker is None:
            raise RuntimeError(f"cannot repair shard {index} of {out_dir}: {problem}")
        return marker, {r["id"]: r for r in read_records(shard_path(out_dir, index))}

    def close(self) -> None:
        stop_stage(self.stage)


def _commit_id(marker: Path) -> str | None:
    """The commit id of an input shard's marker (None: no marker, e.g. a file handed to the processor directly)."""
    try:
        data = read_json(marker)
    except (OSError, ValueError):
        return None
    return data.get("commit_id") if isinstance(data, dict) else None
