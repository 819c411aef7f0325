"""Turning a Stage into shard work: read the input shard, run the stage batch by batch, write, commit.

Nothing here knows about Ray (the runner's executor wraps ``ShardProcessor`` in an actor), so it is tested as plain
Python, and ``gmner_pipeline.testing.run_stage`` uses the same three steps (``start_stage``, ``run_batch``,
``stop_stage``). The record contract holds for the whole run: every input record comes out once, with the same id. A
batch whose call raises is retried record by record, and a record whose call still raises comes out with
``status='error'`` and the exception in ``error`` rather than being lost or failing the shard. A stage that loses or
invents records (``StageContractError``) fails the shard: that is a bug to fix, not bad input.
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

from .keyed import TableFiles, TableRef, collect_items, commit_unit, write_unit
from .scheduler import TableTask
from .schema import STATUS_DROPPED, STATUS_ERROR, STATUS_OK
from .shards import commit_shard, read_records, shard_path, write_records
from .stage import Record, Stage, StageConfig, StageContext, StageContractError, active, check_contract, mark_error

log = logging.getLogger(__name__)

__all__ = ["ShardProcessor", "StageContractError", "check_contract", "run_batch", "shard_stats", "start_stage",
           "stop_stage", "table_items"]


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
            out.append(mark_error(dict(rec), stage.name, f"{stage.name} raised {tb}"))
    return out


def table_items(stage: Stage, records: Any, unit: int | None = None, units: int = 1) -> dict[str, dict[str, Any]]:
    """A keyed stage's ``{key: item}`` over ``records`` (the ok records it accepts), for one unit of the table or all
    of it (``keyed.collect_items`` picks each key's occurrence)."""
    return collect_items(stage.table_keys, (r for r in records if active(r) and stage.accepts(r)), unit, units)


def iter_input(stage: Stage, input_dir: str | Path, num_shards: int) -> Any:
    """The records of a stage's whole (committed) input, shard by shard, with only the columns the table pass needs."""
    columns = None
    if stage.table_columns is not None:
        columns = list(dict.fromkeys(["id", "status", *stage.table_columns]))
    for index in range(num_shards):
        yield from read_records(shard_path(input_dir, index), columns)


class ShardProcessor:
    """One stage instance in a worker process: ``setup`` once, then shard after shard, then ``close``."""

    def __init__(self, stage_cls: type[Stage], config: StageConfig, context: StageContext):
        self.stage = start_stage(stage_cls, config, context)
        self.name = stage_cls.name
        self.batch_size = config.batch_size
        self.context = context

    def run(self, task: Any, extra_stats: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run a scheduler task (``scheduler.ShardTask`` or ``scheduler.TableTask``); returns its commit stats. The
        one entry point an executor needs."""
        if isinstance(task, TableTask):
            return self.build_unit(task.unit, task.table, task.input_dir, task.num_shards, extra_stats)
        return self.process(task.shard, task.in_path, task.out_dir, extra_stats, table=task.table)

    def build_unit(self, unit: int, table: TableRef, input_dir: str | Path, num_shards: int,
                   extra_stats: dict[str, Any] | None = None) -> dict[str, Any]:
        """Compute unit ``unit`` of a keyed stage's table from the stage's whole input; write it and commit it."""
        t0 = time.perf_counter()
        self.stage.take_counters()
        items = table_items(self.stage, iter_input(self.stage, input_dir, num_shards), unit, table.units)
        values = self.stage.compute_table(items)
        write_unit(table.dir, unit, values)
        stats = {"stage": self.name, "stage_key": self.context.stage_key, "run_id": self.context.run_id,
                 "unit": unit, "units": table.units, "keys": len(values),
                 "seconds": round(time.perf_counter() - t0, 3), "host": socket.gethostname(), "pid": os.getpid(),
                 "finished_at": time.time(), **(extra_stats or {})}
        stats["counters"] = self.stage.take_counters()
        llm = self.stage.llm.stats()
        if llm:
            stats["llm"] = llm
        commit_unit(table.dir, unit, stats)
        return stats

    def process(self, index: int, in_path: str | Path, out_dir: str | Path,
                extra_stats: dict[str, Any] | None = None, table: TableRef | None = None) -> dict[str, Any]:
        """Process input shard ``index`` into ``out_dir``; returns the stats written to the commit marker. A keyed
        stage joins ``table`` (committed before its shards run)."""
        t0 = time.perf_counter()
        self.stage.take_counters()  # a shard that failed before on this worker left its counts behind
        if self.stage.keyed():
            if table is None:
                raise ValueError(f"keyed stage {self.name} needs its table to process a shard")
            self.stage.attach_table(TableFiles(table))
        records = read_records(in_path)
        out: list[Record] = []
        for start in range(0, len(records), self.batch_size):
            out.extend(run_batch(self.stage, records[start:start + self.batch_size]))
        check_contract(records, out, self.name)
        write_records(shard_path(out_dir, index), out)
        stats = shard_stats(out, self.name)
        stats.update(stage=self.name, stage_key=self.context.stage_key, run_id=self.context.run_id, shard=index,
                     seconds=round(time.perf_counter() - t0, 3), host=socket.gethostname(), pid=os.getpid(),
                     finished_at=time.time(), **(extra_stats or {}))
        stats["counters"] = self.stage.take_counters()
        llm = self.stage.llm.stats()
        if llm:
            stats["llm"] = llm  # running totals of this worker's clients, per role
        commit_shard(out_dir, index, stats)
        return stats

    def close(self) -> None:
        stop_stage(self.stage)
