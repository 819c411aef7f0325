"""The scheduler without Ray: an in-process executor behind the same five-method interface the Ray pools implement.

Covers what the scheduler owns whatever the backend: pipelining, resume, retries (a retry runs alone), giving up with
the failure reported downstream, and voiding downstream shards whose input is recomputed (file and marker)."""

from __future__ import annotations

from collections import deque

from conftest import write_gmner_dataset
from gmner_pipeline.config import load_config
from gmner_pipeline.ingest_step import run_ingest
from gmner_pipeline.plan import plan_run
from gmner_pipeline.runner import stage_contexts
from gmner_pipeline.scheduler import Scheduler, ShardBook, ShardOutcome, ShardTask
from gmner_pipeline.shards import committed_indices, is_committed, marker_path, shard_path
from gmner_pipeline.stages import load_stage
from gmner_pipeline.worker import ShardProcessor

PLUGIN = "gmner_pipeline.stages.passthrough:PassthroughStage"


class InProcessExecutor:
    """One worker per stage, in this process; runs a task when ``wait`` is called. ``fail``: (stage, shard) ->
    how many times that task raises before it works (-1: always)."""

    def __init__(self, plan, contexts, fail=None):
        self.plan, self.contexts = plan, contexts
        self.fail = dict(fail or {})
        self.workers: dict[int, ShardProcessor] = {}
        self.queue: deque[ShardTask] = deque()
        self.ran: list[tuple[int, int, bool]] = []
        self.released: list[int] = []

    def submit(self, task):
        if any(t.stage == task.stage for t in self.queue):  # one shard in flight per stage
            return False
        self.queue.append(task)
        return True

    def wait(self, timeout):
        task = self.queue.popleft()
        self.ran.append((task.stage, task.shard, task.alone))
        left = self.fail.get((task.stage, task.shard), 0)
        if left:
            self.fail[(task.stage, task.shard)] = left - 1
            return [ShardOutcome(task, error=RuntimeError(f"worker died on shard {task.shard}\nlast line"))]
        if task.stage not in self.workers:
            s = self.plan.stages[task.stage]
            self.workers[task.stage] = ShardProcessor(s.cls, s.config, self.contexts[task.stage])
        return [ShardOutcome(task, stats=self.workers[task.stage].process(task.shard, task.in_path, task.out_dir))]

    def in_flight(self):
        return len(self.queue)

    def starting(self, stage):
        return False

    def release(self, stage):
        self.released.append(stage)
        worker = self.workers.pop(stage, None)
        if worker:
            worker.close()


def setup_run(tmp_path, n=12, shard_size=4):
    data = write_gmner_dataset(tmp_path / "data", n)
    config = load_config(None, [f"run.output_dir={tmp_path / 'out'}", f"run.shard_size={shard_size}",
                                f"source={{kind: twitter_gmner, path: {data}}}", f"pipeline=[passthrough, '{PLUGIN}']"])
    plan = plan_run(config)
    ingest = run_ingest(plan.ingest, config.source, tmp_path / "out" / "cache", "r1")
    for s in plan.stages:
        s.dir.mkdir(parents=True, exist_ok=True)
    return plan, stage_contexts(plan, config, "r1", None), ingest["num_shards"]


def run(plan, contexts, num_shards, fail=None, attempts=3):
    book = ShardBook(plan, num_shards)
    executor = InProcessExecutor(plan, contexts, fail)
    progress = Scheduler(book, executor, attempts).run()
    return progress, executor


def test_shards_flow_downstream_as_soon_as_committed_and_a_rerun_does_nothing(tmp_path):
    plan, contexts, n = setup_run(tmp_path)
    progress, ex = run(plan, contexts, n)
    assert n == 3 and all(committed_indices(s.dir) == {0, 1, 2} for s in plan.stages)
    assert ex.ran.index((1, 0, False)) < ex.ran.index((0, 2, False))  # pipelined, not stage after stage
    assert sorted(ex.released) == [0, 1] and [p.processed_now for p in progress.values()] == [3, 3]
    again, ex2 = run(plan, contexts, n)
    assert ex2.ran == [] and [p.done for p in again.values()] == [3, 3]


def test_a_failed_shard_is_retried_alone_then_given_up_and_reported_downstream(tmp_path):
    plan, contexts, n = setup_run(tmp_path)
    progress, ex = run(plan, contexts, n, fail={(0, 0): 1, (0, 1): -1}, attempts=2)
    assert (0, 0, True) in ex.ran and committed_indices(plan.stages[1].dir) == {0, 2}  # the retry worked
    assert [t for t in ex.ran if t[:2] == (0, 1)] == [(0, 1, False), (0, 1, True)]
    up, down = plan.stages
    assert progress[up.name].failed == [(1, "last line")]
    assert progress[down.name].failed == [(1, "upstream passthrough failed")]


def test_a_recomputed_upstream_shard_voids_the_downstream_file_with_its_marker(tmp_path):
    plan, contexts, n = setup_run(tmp_path)
    run(plan, contexts, n)
    up, down = plan.stages
    for path in (shard_path(up.dir, 1), marker_path(up.dir, 1)):
        path.unlink()
    # the upstream shard keeps failing in this run: its downstream shard must not survive as a stale file
    progress, _ = run(plan, contexts, n, fail={(0, 1): -1}, attempts=1)
    assert not is_committed(down.dir, 1)
    assert not shard_path(down.dir, 1).exists() and not marker_path(down.dir, 1).exists()
    assert progress[down.name].failed == [(1, "upstream passthrough failed")]
    assert load_stage("passthrough") is up.cls
