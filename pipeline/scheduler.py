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
* **healing**: a shard whose marker or file is damaged (``shards.check_shard``) is not committed: its marker is
  removed and the shard redone; a committed shard made from an input shard that is no longer there (its
  ``input_commit`` names another commit) is voided and redone;
* **repairs**: a committed shard holding errors its stage marked transient (``error_kind``) is repaired by default
  (``run.redo_errors``): only those records run again, and the whole shard is rewritten and recommitted; the
  committed shards made from it downstream are then repaired the same way (only their records whose input changed);
* **timeouts** (``Watchdog``): a shard (or a keyed table's unit) that runs longer than ``run.shard_timeout_s``, or
  whose worker shows no progress (a batch done) for ``run.stall_timeout_s``, is abandoned: the executor kills its
  worker and the task is retried like one whose worker crashed;
* **keyed stages** (``keyed.py``): once the stage's whole input is committed, its table is built first, as
  ``TableTask``s (one per unit, committed, checked, retried, resumed and repaired like shards); the stage's shards
  are held until every unit is committed, then run as ``ShardTask``s that join the table. A table whose input changed
  since it was built is voided with the stage's committed shards (``TableBook``);
* a stage's workers are released as soon as no shard can reach the stage any more.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from .keyed import TableRef
from .plan import RunPlan
from .shards import beat_path, read_markers, scan_stage, shard_path, void_shard
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
    repair: str | None = None  # a committed shard to repair (see worker.records_to_redo): which errors to redo


Task = ShardTask | TableTask


def task_where(task: Task) -> tuple[str, int]:
    """The folder and index a task commits to (its beat file lives there): a shard's stage folder, or a unit's
    table folder."""
    if isinstance(task, TableTask):
        return task.table.dir, task.unit
    return task.out_dir, task.shard


def task_key(task: Task) -> tuple[int, str, int]:
    """A running task's identity: its stage, its kind and its index (``alone``/``repair`` do not count)."""
    if isinstance(task, TableTask):
        return task.stage, "unit", task.unit
    return task.stage, "shard", task.shard


def task_label(task: Task) -> str:
    return f"table unit {task.unit}" if isinstance(task, TableTask) else f"shard {task.shard}"


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

    def abandon(self, task: Task, reason: str) -> None:
        """The task is stuck: end its worker; ``wait`` then returns the task as failed with ``reason``."""


class ShardBook:
    """Per stage of a plan: committed shards, shards ready to run, shards still to come, attempts, progress.

    ``redo_errors``: which errors in committed shards a run repairs (``"transient"``, ``"all"`` or ``"none"``)."""

    def __init__(self, plan: RunPlan, num_shards: int, redo_errors: str = "transient"):
        self.plan = plan
        self.stages = plan.stages
        self.redo_errors = redo_errors
        self.progress = {s.name: StageProgress(s.name, num_shards) for s in self.stages}
        self.ready: list[deque[int]] = [deque() for _ in self.stages]
        self.attempts: dict[tuple[int, int], int] = {}
        self.repairs: set[tuple[int, int]] = set()  # queued or running tasks that repair a committed shard
        self.expect_repair: set[tuple[int, int]] = set()  # committed shards to repair once their input is repaired
        self.num_shards = num_shards
        markers = [self._scan(s) for s in self.stages]
        inputs = read_markers(plan.ingest.dir)
        self.committed = [set(m) for m in markers]
        for shard in range(num_shards):  # lineage first: void what was made from an input no longer there
            self._plan_shard(shard, [inputs.get(shard), *(m.get(shard) for m in markers)], queue=False)
        self.tables = KeyedTables(self)  # keyed stages (table_book.py); may void outputs built from a stale input
        for shard in range(num_shards):
            self._plan_shard(shard, [inputs.get(shard), *(m.get(shard) if shard in self.committed[k] else None
                                                          for k, m in enumerate(markers))])
        for s, done in zip(self.stages, self.committed):
            self.progress[s.name].done = len(done & set(range(num_shards)))
        self.pending = [num_shards - self.progress[s.name].done for s in self.stages]
        for k, shard in self.repairs | self.expect_repair:
            self.pending[k] += 1
        self.tables.input_will_change()
        for k in range(len(self.stages)):
            self.tables.input_grew(k)

    def _arrive(self, k: int, shard: int) -> None:
        """Shard ``shard`` is ready for stage ``k`` (to run, or to be repaired): queued, unless a keyed stage's table
        holds it."""
        if not self.tables.hold(k, shard):
            self.ready[k].append(shard)

    def has_ready(self, k: int) -> bool:
        return bool(self.ready[k]) or bool(self.tables.ready(k))

    def give_up(self, k: int, shard: int, reason: str) -> None:
        """Report ``shard`` failed at stage ``k`` and, as unreachable, at every later stage that has not got it. A
        failed repair leaves the committed shard as it was, and those made from it too."""
        self.progress[self.stages[k].name].failed.append((shard, reason))
        self.pending[k] -= 1
        if (k, shard) in self.repairs:
            self.repairs.discard((k, shard))
            for j in range(k + 1, len(self.stages)):
                if (j, shard) in self.expect_repair:
                    self.expect_repair.discard((j, shard))
                    self.pending[j] -= 1
            return
        for j in range(k + 1, len(self.stages)):
            if shard not in self.committed[j]:
                self.pending[j] -= 1
                self.progress[self.stages[j].name].failed.append((shard, f"upstream {self.stages[k].name} failed"))

    def _scan(self, stage: Any) -> dict[int, dict[str, Any]]:
        """The stage's intact committed shards; damaged ones are un-committed (marker removed) and logged."""
        committed, damaged = scan_stage(stage.dir)
        for index, problem in sorted(damaged.items()):
            log.warning("%s shard %d is not committed (%s); it will be redone", stage.name, index, problem)
            void_shard(stage.dir, index)
            self.progress[stage.name].healed.append((index, problem))
        return committed

    def _plan_shard(self, shard: int, chain: list[dict[str, Any] | None], queue: bool = True) -> None:
        """Decide what shard ``shard`` needs, from its markers along the chain (``chain[0]``: ingest); with
        ``queue=False`` only void what is stale (the keyed tables are checked between the two passes)."""
        repairing = False
        for k in range(len(self.stages)):
            marker, upstream = chain[k + 1], chain[k]
            link = "missing" if marker is None else input_link(marker, upstream)
            if link == "stale" and not queue:
                log.warning("%s shard %d was made from an input shard that has since been recomputed; redoing it",
                            self.stages[k].name, shard)
            if link in ("missing", "stale"):
                self._void_from(k, shard)
                if queue and not repairing:
                    self._arrive(k, shard)
                return
            if not queue:
                continue
            if repairing:
                self.expect_repair.add((k, shard))
            elif link == "repaired" or self._has_errors_to_redo(marker):
                self.repairs.add((k, shard))
                self._arrive(k, shard)
                repairing = True

    def _has_errors_to_redo(self, marker: dict[str, Any]) -> bool:
        if self.redo_errors == "all":
            return bool(marker.get("new_errors"))
        if self.redo_errors == "transient":
            return bool(marker.get("new_errors_transient"))
        return False

    def _void_downstream(self, k: int, shard: int) -> None:
        """The shards after stage ``k`` made from the output it is about to replace (keyed tables use it)."""
        if k + 1 < len(self.stages):
            self._void_from(k + 1, shard, only_committed=True)

    def _void_from(self, k: int, shard: int, only_committed: bool = False) -> None:
        """Shard ``shard`` of stage ``k`` and every stage after it are void: keeping a downstream shard would pair a
        new upstream shard with results computed from the old one."""
        for j in range(k, len(self.stages)):
            if shard in self.committed[j] or (j == k and not only_committed):
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
                         alone=self.attempts.get((k, shard), 0) > 0, table=self.tables.ref(k),
                         repair=self.redo_errors if (k, shard) in self.repairs else None)

    def committed_now(self, k: int, shard: int, stats: dict[str, Any]) -> None:
        sp = self.progress[self.stages[k].name]
        repaired = (k, shard) in self.repairs
        self.repairs.discard((k, shard))
        if repaired:
            sp.repaired_now += 1
            sp.records_redone += stats.get("redone", 0)
        else:
            sp.done += 1
            sp.processed_now += 1
            sp.records_now += stats.get("records_in", 0)
        self.pending[k] -= 1
        self.committed[k].add(shard)
        nxt = k + 1
        if (nxt, shard) in self.expect_repair:  # its input was just repaired: repair it in turn
            self.expect_repair.discard((nxt, shard))
            self.repairs.add((nxt, shard))
            self._arrive(nxt, shard)
            self.tables.input_grew(nxt)
            return
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
            self.progress[name].retried.append((shard, error))
            self.ready[k].appendleft(shard)
            return True
        log.error("%s shard %d failed %d times, giving up for this run: %s", name, shard, n, error)
        repair = (k, shard) in self.repairs
        self.give_up(k, shard, error)  # it can never reach the later stages in this run
        if repair:  # a failed repair keeps its committed shard: a keyed stage after it still has its whole input
            self.tables.input_grew(k + 1)
        else:
            self.tables.upstream_failed(k, shard)
        return False

    def finished(self, k: int) -> bool:
        """No shard can reach stage ``k`` any more in this run."""
        return self.pending[k] == 0 and not any(self.pending[j] for j in range(k))


def input_link(marker: dict[str, Any], upstream: dict[str, Any] | None) -> str:
    """How a committed shard relates to the input shard there now: ``"ok"`` (made from it, or either marker predates
    commit ids), ``"repaired"`` (made from a commit the input's repair replaced: repair it too) or ``"stale"`` (made
    from another input: redo it)."""
    made_from = marker.get("input_commit")
    current = (upstream or {}).get("commit_id")
    if made_from is None or current is None or made_from == current:
        return "ok"
    if made_from in ((upstream or {}).get("replaces") or ()):
        return "repaired"
    return "stale"


class Watchdog:
    """Finds stuck shards: one running longer than ``shard_timeout_s``, or whose worker has shown no progress for
    ``stall_timeout_s``. Progress is the worker's beat file (``shards.beat_path``: created when the shard starts,
    touched after every batch); all times are the driver's own clock (what it saw, when), so clocks of other nodes do
    not matter, and time a shard spends queued behind another on its worker does not count."""

    def __init__(self, shard_timeout_s: float | None, stall_timeout_s: float | None,
                 clock: Callable[[], float] = time.monotonic):
        self.shard_timeout_s = shard_timeout_s
        self.stall_timeout_s = stall_timeout_s
        self.clock = clock
        self.seen: dict[tuple, tuple[float, float, Any]] = {}  # task key -> (started, last progress, beat stat)

    @property
    def active(self) -> bool:
        return bool(self.shard_timeout_s or self.stall_timeout_s)

    def forget(self, task: Task) -> None:
        self.seen.pop(task_key(task), None)

    def stuck(self, tasks: list[Task]) -> list[tuple[Task, str]]:
        """The running ``tasks`` (shards and table units) to abandon now, each with the reason."""
        now = self.clock()
        out = []
        for task in tasks:
            key = task_key(task)
            try:
                st = beat_path(*task_where(task)).stat()  # a local file, or an object in a bucket
                beat = (st.st_mtime_ns, st.st_size, st.st_ino)
            except OSError:
                continue  # not started on its worker yet (queued behind another shard, or the worker is starting)
            started, progressed, last = self.seen.get(key, (now, now, beat))
            if beat != last:
                progressed = now
            self.seen[key] = (started, progressed, beat)
            if self.shard_timeout_s and now - started > self.shard_timeout_s:
                out.append((task, f"timed out: running for more than run.shard_timeout_s={self.shard_timeout_s:g} s"))
            elif self.stall_timeout_s and now - progressed > self.stall_timeout_s:
                out.append((task, f"timed out: no progress for more than run.stall_timeout_s="
                                  f"{self.stall_timeout_s:g} s (a stuck or stopped worker)"))
        return out


class ShardTimeout(RuntimeError):
    """A shard the watchdog abandoned (its worker was ended); it is retried like a crashed one."""


class Scheduler:
    def __init__(self, book: ShardBook, executor: Executor, max_attempts: int, watchdog: Watchdog | None = None):
        self.book = book
        self.executor = executor
        self.max_attempts = max_attempts
        self.watchdog = watchdog
        self.released: set[int] = set()
        self.running: dict[tuple, Task] = {}
        self.abandoned: set[tuple] = set()

    def run(self, on_progress: Callable[[dict[str, StageProgress]], None] | None = None) -> dict[str, StageProgress]:
        book, executor = self.book, self.executor
        self.submit_ready()
        while executor.in_flight() or any(book.has_ready(k) and executor.starting(k) for k in range(len(book.stages))):
            for outcome in executor.wait(timeout=1.0):
                self.record(outcome)
            self.check_stuck()
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
                    task = make(k)
                    if not self.executor.submit(task):
                        break
                    q.popleft()
                    self.running[task_key(task)] = task

    def check_stuck(self) -> None:
        if self.watchdog is None or not self.watchdog.active:
            return
        running = [t for key, t in self.running.items() if key not in self.abandoned]
        for task, reason in self.watchdog.stuck(running):
            log.warning("%s %s %s; ending its worker", self.book.stages[task.stage].name, task_label(task), reason)
            self.abandoned.add(task_key(task))
            self.executor.abandon(task, reason)

    def record(self, outcome: ShardOutcome) -> None:
        task = outcome.task
        k = task.stage
        self.running.pop(task_key(task), None)
        self.abandoned.discard(task_key(task))
        if self.watchdog is not None:
            self.watchdog.forget(task)
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
