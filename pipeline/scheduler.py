"""Which shard runs where next: the scheduler, independent of how shards are executed.

``ShardBook`` holds the state of a run per stage (committed shards, the queue of shards ready to run, how many are
still to come, attempts, progress). ``Scheduler`` moves shards through it and hands them as ``ShardTask``s to an
``Executor``: the Ray actor pools (``ray_executor.RayExecutor``) today; any object with the five methods below works
(an in-process executor for debugging is the next one). Behaviour, whatever the executor:

* **pipelining**: shard ``i`` moves to stage ``k+1`` as soon as stage ``k`` committed it;
* **resume**: a shard committed by an earlier run is never redone; a committed downstream shard whose upstream shard
  is about to be recomputed is voided first (file and marker), so it is recomputed from the new input;
* **retries**: a failed shard is queued again (first in line, to run alone on an idle worker) until
  ``run.shard_attempts``; then it is reported, the shards it would have fed downstream are reported too, and the rest
  of the run completes;
* a stage's workers are released as soon as no shard can reach the stage any more;
* **keyed stages** (``keyed.py``): once the stage's whole input is committed, its table is built first, as
  ``TableTask``s (one per unit, committed, retried and resumed like shards); the stage's shards are held until every
  unit is committed, then run as ``ShardTask``s that join the table. A table whose input changed since it was built is
  voided with the stage's committed shards (``TableBook``).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from .keyed import (TableRef, committed_units, input_fingerprint, read_manifest, table_dir, void_table,
                    write_manifest)
from .plan import RunPlan
from .shards import committed_indices, shard_path, void_shard
from .summary import StageProgress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardTask:
    stage: int  # index into plan.stages
    shard: int
    in_path: str
    out_dir: str
    alone: bool = False  # a retry: run it by itself on an idle worker (it may be what kills its worker)
    table: TableRef | None = None  # a keyed stage's committed table, which the shard joins


@dataclass(frozen=True)
class TableTask:
    """One unit of a keyed stage's table, computed from the stage's whole input (``input_dir``, shards
    ``0..num_shards-1``, all committed) and committed into ``table.dir``."""

    stage: int
    unit: int
    table: TableRef
    input_dir: str
    num_shards: int
    alone: bool = False


Task = ShardTask | TableTask


@dataclass
class ShardOutcome:
    task: Task
    stats: dict[str, Any] | None = None  # the commit marker's stats
    error: BaseException | None = None


class Executor(Protocol):
    """Runs tasks on workers: one pool of workers per stage, each worker with the stage set up once. A worker runs a
    task with ``worker.ShardProcessor.run(task)``, whatever its kind (``ShardTask`` or ``TableTask``)."""

    def submit(self, task: Task) -> bool:
        """Start the task on a free worker of its stage; False when no worker can take it now."""

    def wait(self, timeout: float) -> list[ShardOutcome]:
        """Tasks that finished (committed, or failed with the error); may return none within ``timeout``."""

    def in_flight(self) -> int:
        """Tasks submitted and not yet returned by ``wait``."""

    def starting(self, stage: int) -> bool:
        """Workers of the stage are still starting: work queued for it will find a slot later."""

    def release(self, stage: int) -> None:
        """The stage gets no more tasks: close its workers (their stages' ``close()``) and free their resources."""


class TableBook:
    """The table of one keyed stage: ``waiting`` for the stage's whole input, ``building`` (units ready / committed),
    ``done`` (its shards may run), or ``failed`` for this run. Shards that reach the stage before the table is done
    are ``held``."""

    def __init__(self, ref: TableRef, input_dir: Path, num_shards: int):
        self.ref = ref
        self.input_dir = input_dir
        self.num_shards = num_shards
        self.phase = "waiting"
        self.committed: set[int] = set()
        self.ready: deque[int] = deque()
        self.held: list[int] = []
        self.failure: str | None = None

    def void(self) -> None:
        void_table(self.ref.dir)
        self.committed = set()

    def start(self) -> None:
        """The input is complete: keep the units built from this very input, void the rest, queue what is missing."""
        fingerprint = input_fingerprint(self.input_dir, self.num_shards)
        manifest = read_manifest(self.ref.dir)
        if manifest != {"units": self.ref.units, "input": fingerprint}:
            self.void()
            write_manifest(self.ref.dir, self.ref.units, fingerprint)
        self.committed = committed_units(self.ref.dir, self.ref.units)
        self.ready = deque(u for u in range(self.ref.units) if u not in self.committed)
        self.phase = "building" if self.ready else "done"

    def is_current(self) -> bool:
        """The table on disk was built from the input as it is now (which must be complete)."""
        manifest = read_manifest(self.ref.dir)
        return manifest == {"units": self.ref.units, "input": input_fingerprint(self.input_dir, self.num_shards)}


class ShardBook:
    """Per stage of a plan: committed shards, shards ready to run, shards still to come, attempts, progress."""

    def __init__(self, plan: RunPlan, num_shards: int):
        self.plan = plan
        self.stages = plan.stages
        self.progress = {s.name: StageProgress(s.name, num_shards) for s in self.stages}
        self.committed = [committed_indices(s.dir) for s in self.stages]
        self.ready: list[deque[int]] = [deque() for _ in self.stages]
        self.attempts: dict[tuple[int, int], int] = {}
        self.table_attempts: dict[tuple[int, int], int] = {}
        self.num_shards = num_shards
        self.tables: dict[int, TableBook] = {}
        for k, s in enumerate(self.stages):
            if s.cls.keyed():
                self._init_table(k)
        for shard in range(num_shards):
            for k, done in enumerate(self.committed):
                if shard not in done:
                    self._arrive(k, shard)
                    self._void_downstream(k, shard)
                    break
        for s, done in zip(self.stages, self.committed):
            self.progress[s.name].done = len(done & set(range(num_shards)))
        self.pending = [num_shards - self.progress[s.name].done for s in self.stages]
        for k in self.tables:
            self._maybe_start_table(k)

    # --- keyed stages ----------------------------------------------------------------------------------------------

    def _input_dir(self, k: int) -> Path:
        return self.plan.ingest.dir if k == 0 else self.stages[k - 1].dir

    def _input_complete(self, k: int) -> bool:
        return k == 0 or all(i in self.committed[k - 1] for i in range(self.num_shards))

    def _init_table(self, k: int) -> None:
        """A keyed stage's outputs are valid only with the table built from its current input: when that input is
        incomplete (a shard of it is about to be recomputed) or changed since the table was built, the table and the
        stage's committed shards are voided (with what was made from them downstream)."""
        s = self.stages[k]
        res = s.config.resources
        table = self.tables[k] = TableBook(TableRef(str(table_dir(s.dir)), res.table_units), self._input_dir(k),
                                           self.num_shards)
        all_done = all(i in self.committed[k] for i in range(self.num_shards))
        if self._input_complete(k) and (all_done or table.is_current()):
            table.phase = "done" if all_done else "waiting"
            return
        if self.committed[k] or table.committed or read_manifest(table.ref.dir):
            log.warning("%s: its input changed since its keyed table was built: the table and the stage's %d "
                        "committed shards are rebuilt", s.name, len(self.committed[k]))
        table.void()
        for shard in sorted(self.committed[k]):
            void_shard(s.dir, shard)
            self._void_downstream(k, shard)
        self.committed[k] = set()

    def _arrive(self, k: int, shard: int) -> None:
        """Shard ``shard`` is ready for stage ``k``: queue it, or hold it until the stage's table is done."""
        table = self.tables.get(k)
        if table is None or table.phase == "done":
            self.ready[k].append(shard)
        elif table.phase == "failed":
            self._give_up(k, shard, table.failure or "keyed table failed")
        else:
            table.held.append(shard)

    def _maybe_start_table(self, k: int) -> None:
        table = self.tables[k]
        if table.phase != "waiting" or not self._input_complete(k):
            return
        table.start()
        sp = self.progress[self.stages[k].name]
        sp.units_total, sp.units_done = table.ref.units, len(table.committed)
        if table.phase == "done":
            self._release_held(k)
        else:
            log.info("%s: building its keyed table (%d units) from its whole input", self.stages[k].name,
                     table.ref.units)

    def _release_held(self, k: int) -> None:
        table = self.tables[k]
        self.ready[k].extend(sorted(table.held))
        table.held.clear()

    def has_ready(self, k: int) -> bool:
        return bool(self.ready[k]) or (k in self.tables and bool(self.tables[k].ready))

    def table_task(self, k: int) -> TableTask:
        """The next ready unit of stage ``k``'s table as a task (not yet taken from the queue)."""
        table = self.tables[k]
        unit = table.ready[0]
        return TableTask(k, unit, table.ref, str(table.input_dir), self.num_shards,
                         alone=self.table_attempts.get((k, unit), 0) > 0)

    def unit_committed(self, k: int, unit: int) -> None:
        table = self.tables[k]
        table.committed.add(unit)
        self.progress[self.stages[k].name].units_done = len(table.committed)
        if len(table.committed) == table.ref.units:
            table.phase = "done"
            log.info("%s: keyed table complete", self.stages[k].name)
            self._release_held(k)

    def unit_failed(self, k: int, unit: int, error: str, max_attempts: int) -> bool:
        """Count a failed unit; True when queued again, False when the table (and so the stage) is given up."""
        n = self.table_attempts[(k, unit)] = self.table_attempts.get((k, unit), 0) + 1
        name = self.stages[k].name
        table = self.tables[k]
        if n < max_attempts:
            log.warning("%s table unit %d failed (attempt %d/%d): %s; retrying", name, unit, n, max_attempts, error)
            table.ready.appendleft(unit)
            return True
        log.error("%s table unit %d failed %d times, giving up the stage for this run: %s", name, unit, n, error)
        self._fail_table(k, f"keyed table unit {unit} failed: {error}")
        return False

    def _fail_table(self, k: int, reason: str) -> None:
        table = self.tables[k]
        table.phase, table.failure = "failed", reason
        table.ready.clear()
        for shard in table.held:
            self._give_up(k, shard, reason)
        table.held.clear()

    def _give_up(self, k: int, shard: int, reason: str) -> None:
        """Report ``shard`` failed at stage ``k`` and, as unreachable, at every later stage that has not got it."""
        self.progress[self.stages[k].name].failed.append((shard, reason))
        self.pending[k] -= 1
        for j in range(k + 1, len(self.stages)):
            if shard not in self.committed[j]:
                self.pending[j] -= 1
                self.progress[self.stages[j].name].failed.append((shard, f"upstream {self.stages[k].name} failed"))

    def _void_downstream(self, k: int, shard: int) -> None:
        """Downstream shards made from the output stage ``k`` is about to replace are void: keeping them would pair a
        new upstream shard with results computed from the old one."""
        for j in range(k + 1, len(self.stages)):
            if shard in self.committed[j]:
                void_shard(self.stages[j].dir, shard)
                self.committed[j].discard(shard)

    @property
    def idle(self) -> bool:
        """Nothing to do in this run."""
        return not any(self.pending)

    def task(self, k: int) -> ShardTask:
        """The next ready shard of stage ``k`` as a task (not yet taken from the queue)."""
        shard = self.ready[k][0]
        source = self.plan.ingest.dir if k == 0 else self.stages[k - 1].dir
        table = self.tables.get(k)
        return ShardTask(k, shard, str(shard_path(source, shard)), str(self.stages[k].dir),
                         alone=self.attempts.get((k, shard), 0) > 0, table=table.ref if table else None)

    def committed_now(self, k: int, shard: int, stats: dict[str, Any]) -> None:
        sp = self.progress[self.stages[k].name]
        sp.done += 1
        sp.processed_now += 1
        sp.records_now += stats.get("records_in", 0)
        self.pending[k] -= 1
        self.committed[k].add(shard)
        nxt = k + 1
        while nxt < len(self.stages) and shard in self.committed[nxt]:
            nxt += 1  # already done downstream (e.g. an interrupted earlier run got further)
        if nxt < len(self.stages):
            self._arrive(nxt, shard)
        if k + 1 in self.tables:
            self._maybe_start_table(k + 1)

    def failed_now(self, k: int, shard: int, error: str, max_attempts: int) -> bool:
        """Count a failure; True when the shard is queued again, False when it is given up for this run."""
        n = self.attempts[(k, shard)] = self.attempts.get((k, shard), 0) + 1
        name = self.stages[k].name
        if n < max_attempts:
            log.warning("%s shard %d failed (attempt %d/%d): %s; retrying", name, shard, n, max_attempts, error)
            self.ready[k].appendleft(shard)
            return True
        log.error("%s shard %d failed %d times, giving up for this run: %s", name, shard, n, error)
        self._give_up(k, shard, error)  # it can never reach the later stages in this run
        for j, table in self.tables.items():  # a keyed stage after it can never have its whole input
            if j > k and table.phase == "waiting":
                log.error("%s: its keyed table needs the whole input; %s shard %d failed, so it waits for a rerun",
                          self.stages[j].name, name, shard)
                self._fail_table(j, f"keyed table needs the whole input: upstream {name} shard {shard} failed")
        return False

    def finished(self, k: int) -> bool:
        """No shard can reach stage ``k`` any more in this run."""
        return self.pending[k] == 0 and not any(self.pending[j] for j in range(k))


class Scheduler:
    def __init__(self, book: ShardBook, executor: Executor, max_attempts: int):
        self.book = book
        self.executor = executor
        self.max_attempts = max_attempts
        self.released: set[int] = set()

    def run(self, on_progress: Callable[[dict[str, StageProgress]], None] | None = None) -> dict[str, StageProgress]:
        book, executor = self.book, self.executor
        self.submit_ready()
        while executor.in_flight() or any(book.has_ready(k) and executor.starting(k) for k in range(len(book.stages))):
            for outcome in executor.wait(timeout=1.0):
                self.record(outcome)
            self.submit_ready()
            if on_progress:
                on_progress(book.progress)
        for k in range(len(book.stages)):
            self.release(k)
        return book.progress

    def submit_ready(self) -> None:
        for k, queue in enumerate(self.book.ready):
            table = self.book.tables.get(k)
            for q, make in ((table.ready if table else None, self.book.table_task), (queue, self.book.task)):
                while q:
                    sp = self.book.progress[self.book.stages[k].name]
                    if sp.started is None:
                        sp.started = time.perf_counter()
                    if not self.executor.submit(make(k)):
                        break
                    q.popleft()

    def record(self, outcome: ShardOutcome) -> None:
        task = outcome.task
        k = task.stage
        if isinstance(task, TableTask):
            if outcome.error is None:
                self.book.unit_committed(k, task.unit)
            else:
                self.book.unit_failed(k, task.unit, short_error(outcome.error), self.max_attempts)
        elif outcome.error is None:
            self.book.committed_now(k, task.shard, outcome.stats or {})
        else:
            self.book.failed_now(k, task.shard, short_error(outcome.error), self.max_attempts)
        for j, stage in enumerate(self.book.stages):
            sp = self.book.progress[stage.name]
            if self.book.pending[j] == 0 and sp.finished is None:
                sp.finished = time.perf_counter()
            if self.book.finished(j):  # free its CPUs/GPUs for the later stages
                self.release(j)

    def release(self, k: int) -> None:
        if k not in self.released:
            self.released.add(k)
            self.executor.release(k)


def short_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[-1] if text else type(exc).__name__)[:500]
