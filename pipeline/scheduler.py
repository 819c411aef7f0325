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
from typing import Any, Callable, Protocol

from .keyed import TableRef
from .plan import RunPlan
from .shards import committed_indices, shard_path, void_shard
from .summary import StageProgress
from .table_book import KeyedTables, TableTask

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardTask:
    stage: int  # index into plan.stages
    shard: int
    in_path: str
    out_dir: str
    alone: bool = False  # a retry: run it by itself on an idle worker (it may be what kills its worker)
    table: TableRef | None = None  # a keyed stage's committed table, which the shard joins


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


class ShardBook:
    """Per stage of a plan: committed shards, shards ready to run, shards still to come, attempts, progress."""

    def __init__(self, plan: RunPlan, num_shards: int):
        self.plan = plan
        self.stages = plan.stages
        self.progress = {s.name: StageProgress(s.name, num_shards) for s in self.stages}
        self.committed = [committed_indices(s.dir) for s in self.stages]
        self.ready: list[deque[int]] = [deque() for _ in self.stages]
        self.attempts: dict[tuple[int, int], int] = {}
        self.num_shards = num_shards
        self.tables = KeyedTables(self)  # keyed stages (table_book.py); may void outputs built from a stale input
        for shard in range(num_shards):
            for k, done in enumerate(self.committed):
                if shard not in done:
                    self._arrive(k, shard)
                    self._void_downstream(k, shard)
                    break
        for s, done in zip(self.stages, self.committed):
            self.progress[s.name].done = len(done & set(range(num_shards)))
        self.pending = [num_shards - self.progress[s.name].done for s in self.stages]
        for k in range(len(self.stages)):
            self.tables.input_grew(k)

    def _arrive(self, k: int, shard: int) -> None:
        """Shard ``shard`` is ready for stage ``k``: queued, unless a keyed stage's table holds it."""
        if not self.tables.hold(k, shard):
            self.ready[k].append(shard)

    def has_ready(self, k: int) -> bool:
        return bool(self.ready[k]) or bool(self.tables.ready(k))

    def give_up(self, k: int, shard: int, reason: str) -> None:
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
        return ShardTask(k, shard, str(shard_path(source, shard)), str(self.stages[k].dir),
                         alone=self.attempts.get((k, shard), 0) > 0, table=self.tables.ref(k))

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
        self.tables.input_grew(k + 1)

    def failed_now(self, k: int, shard: int, error: str, max_attempts: int) -> bool:
        """Count a failure; True when the shard is queued again, False when it is given up for this run."""
        n = self.attempts[(k, shard)] = self.attempts.get((k, shard), 0) + 1
        name = self.stages[k].name
        if n < max_attempts:
            log.warning("%s shard %d failed (attempt %d/%d): %s; retrying", name, shard, n, max_attempts, error)
            self.ready[k].appendleft(shard)
            return True
        log.error("%s shard %d failed %d times, giving up for this run: %s", name, shard, n, error)
        self.give_up(k, shard, error)  # it can never reach the later stages in this run
        self.tables.upstream_failed(k, shard)
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
            for q, make in ((self.book.tables.ready(k), self.book.tables.task), (queue, self.book.task)):
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
                self.book.tables.unit_committed(k, task.unit)
            else:
                self.book.tables.unit_failed(k, task.unit, short_error(outcome.error), self.max_attempts)
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
