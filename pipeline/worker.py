"""Turning a Stage into shard work: read the input shard, run the stage batch by batch, write, commit.

``ShardProcessor`` knows nothing about Ray (the runner wraps it in an actor), so it is tested as plain Python.
It guarantees the stage contract for the run: every input record comes out once, with the same id. A batch whose
call raises is retried record by record, and a record whose call still raises comes out with ``status='error'``
and the exception in ``error`` rather than being lost or failing the shard.
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

from .schema import STATUS_DROPPED, STATUS_ERROR, STATUS_OK
from .shards import commit_shard, read_records, write_records
from .stage import Record, Stage, StageConfig, StageContext, mark_error

log = logging.getLogger(__name__)


class StageContractError(RuntimeError):
    """The stage returned records that do not match its input (lost, added or renamed records)."""


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


class ShardProcessor:
    def __init__(self, stage_cls: type[Stage], config: StageConfig, context: StageContext):
        self.stage = stage_cls(config, context)
        self.name = stage_cls.name
        self.batch_size = config.batch_size
        self.context = context
        self.stage.setup()

    def process(self, index: int, in_path: str | Path, out_dir: str | Path) -> dict[str, Any]:
        """Process input shard ``index`` into ``out_dir``; returns the stats written to the commit marker."""
        t0 = time.perf_counter()
        records = read_records(in_path)
        out: list[Record] = []
        for start in range(0, len(records), self.batch_size):
            out.extend(self._run_batch(records[start:start + self.batch_size]))
        check_contract(records, out, self.name)
        from .shards import shard_path

        write_records(shard_path(out_dir, index), out)
        stats = shard_stats(out, self.name)
        stats.update(stage=self.name, stage_key=self.context.stage_key, run_id=self.context.run_id, shard=index,
                     seconds=round(time.perf_counter() - t0, 3), host=socket.gethostname(), pid=os.getpid(),
                     finished_at=time.time())
        commit_shard(out_dir, index, stats)
        return stats

    def _run_batch(self, batch: list[Record]) -> list[Record]:
        ids = [r["id"] for r in batch]
        try:
            return self.stage([dict(r) for r in batch])
        except Exception:  # noqa: BLE001 - isolate the failing record(s) below
            log.warning("stage %s failed on a batch of %d; retrying record by record", self.name, len(batch),
                        exc_info=True)
        out = []
        for rec, rid in zip(batch, ids):
            try:
                result = self.stage([dict(rec)])
                if len(result) != 1 or result[0].get("id") != rid:
                    raise StageContractError(f"returned {len(result)} records for 1")
                out.append(result[0])
            except Exception as exc:  # noqa: BLE001 - the record carries the error; the run goes on
                tb = traceback.format_exception_only(type(exc), exc)[-1].strip()
                out.append(mark_error(dict(rec), self.name, f"{self.name} raised {tb}"))
        return out

    def close(self) -> None:
        self.stage.close()


def check_contract(inputs: list[Record], outputs: list[Record], stage: str) -> None:
    a = Counter(r["id"] for r in inputs)
    b = Counter(r.get("id") for r in outputs)
    if a != b:
        lost = sorted((a - b).elements())[:5]
        added = sorted(map(str, (b - a).elements()))[:5]
        raise StageContractError(f"stage {stage} must return every input record exactly once; "
                                 f"lost {lost}, added {added}")
