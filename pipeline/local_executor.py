"""The scheduler's ``Executor`` in the driver's own process (``--executor local``): no Ray at all. It runs both kinds
of task (shards, and the units of a keyed stage's table) through ``worker.ShardProcessor.run``, as Ray's actors do.

For a debugger (a breakpoint in a stage's ``process`` stops where you expect, in your terminal) and for tiny runs,
where starting Ray costs more than the work. The commit protocol is the one every executor shares
(``worker.ShardProcessor``: write the shard, check the driver, commit the marker), so resume, healing, repairs and
exactly-once hold as with Ray; the tests run the same fault cases against both.

What differs: one shard at a time (stages still take turns shard by shard, so a shard reaches the last stage before
the next one is read); no parallelism and no ``resources``; a stage that kills its process (a segfault, an OOM kill)
ends the run, whose rerun then resumes from the committed shards; and timeouts are checked between batches only (a
process cannot stop its own stuck code), so ``run.shard_timeout_s`` / ``run.stall_timeout_s`` end a shard at its next
batch boundary instead of killing a worker.
"""

from __future__ import annotations

import logging
import time
from collections import deque

from .plan import StagePlan
from .scheduler import ShardOutcome, ShardTimeout, Task, task_label, task_where
from .stage import StageContext
from .worker import Beat, ShardProcessor, lock_to_check

log = logging.getLogger(__name__)


class DeadlineBeat(Beat):
    """The beat of an in-process shard: also ends the shard (``ShardTimeout``) at a batch boundary once it ran
    longer than ``shard_timeout_s``, or its last batch took longer than ``stall_timeout_s``."""

    def __init__(self, task: Task, lock_file: str | None, shard_timeout_s: float | None,
                 stall_timeout_s: float | None):
        super().__init__(*task_where(task), lock_file)
        self.shard_timeout_s = shard_timeout_s
        self.stall_timeout_s = stall_timeout_s
        self.started = self.last = time.monotonic()

    def __call__(self) -> None:
        now = time.monotonic()
        if self.shard_timeout_s and now - self.started > self.shard_timeout_s:
            raise ShardTimeout(f"timed out: running for more than run.shard_timeout_s={self.shard_timeout_s:g} s")
        if self.stall_timeout_s and now - self.last > self.stall_timeout_s:
            raise ShardTimeout(f"timed out: a batch took more than run.stall_timeout_s={self.stall_timeout_s:g} s")
        self.last = now
        super().__call__()


class LocalExecutor:
    """One stage instance per stage, in this process, set up on first use; at most one queued shard per stage,
    run in the order submitted when the scheduler waits."""

    def __init__(self, stages: list[StagePlan], contexts: list[StageContext], shard_timeout_s: float | None = None,
                 stall_timeout_s: float | None = None):
        self.stages = stages
        self.contexts = contexts
        self.shard_timeout_s = shard_timeout_s
        self.stall_timeout_s = stall_timeout_s
        self.workers: dict[int, ShardProcessor] = {}
        self.queue: deque[Task] = deque()

    def submit(self, task: Task) -> bool:
        if any(t.stage == task.stage for t in self.queue):
            return False
        self.queue.append(task)
        return True

    def wait(self, timeout: float) -> list[ShardOutcome]:
        if not self.queue:
            return []
        task = self.queue.popleft()
        context = self.contexts[task.stage]
        beat = DeadlineBeat(task, lock_to_check(context), self.shard_timeout_s, self.stall_timeout_s)
        try:
            worker = self._worker(task.stage)
            return [ShardOutcome(task, stats=worker.run(task, beat=beat))]
        except Exception as exc:  # noqa: BLE001 - the shard failed; the scheduler retries it or reports it
            log.debug("%s of stage %s failed in-process", task_label(task), self.stages[task.stage].name,
                      exc_info=True)
            return [ShardOutcome(task, error=exc)]

    def _worker(self, stage: int) -> ShardProcessor:
        if stage not in self.workers:
            s = self.stages[stage]
            self.workers[stage] = ShardProcessor(s.cls, s.config, self.contexts[stage])
        return self.workers[stage]

    def in_flight(self) -> int:
        return len(self.queue)

    def starting(self, stage: int) -> bool:
        return False

    def release(self, stage: int) -> None:
        worker = self.workers.pop(stage, None)
        if worker is not None:
            worker.close()

    def abandon(self, task: Task, reason: str) -> None:
        """Nothing to end: an in-process shard is only ever checked between batches (``DeadlineBeat``)."""
