"""Keyed tables (pipeline/keyed.py) through the scheduler with an in-process executor: each key computed once however
the input is sharded, in whatever order shards run and with however many workers, the same result every time; a
rerun computes nothing; a failed unit is retried and an interrupted table resumes; a changed input rebuilds the table
and the stage; an upstream shard that fails for good fails the keyed stage (it needs its whole input)."""

from __future__ import annotations

from collections import Counter, deque
from pathlib import Path

import pytest

from gmner_pipeline.config import load_config
from gmner_pipeline.ingest_step import run_ingest
from gmner_pipeline.keyed import TableKey, collect_items, table_dir, unit_marker_path, unit_of
from gmner_pipeline.plan import plan_run
from gmner_pipeline.runner import stage_contexts
from gmner_pipeline.scheduler import Scheduler, ShardBook, ShardOutcome, TableTask
from gmner_pipeline.shards import committed_indices, iter_committed_records, marker_path
from gmner_pipeline.stage import Stage
from gmner_pipeline.summary import stage_totals
from gmner_pipeline.worker import ShardProcessor

BUILT: list[str] = []  # keys built by KeyedEcho, in this process (the in-process executor)
KEYED = "test_keyed_table:KeyedEcho"


class KeyedEcho(Stage):
    """Per entity text: the id of the first record that mentions it (what a keyed table must get right)."""

    name = "keyed_echo"
    reads = frozenset()
    writes = frozenset({"knowledge"})

    def table_keys(self, record):
        for e in record["entities"]:
            yield TableKey(e["text"], {"first": record["id"], "type": e["type"]})

    def build_table(self, items):
        BUILT.extend(items)
        self.count("built", len(items))
        return {k: {"first": v["first"], "type": v["type"]} for k, v in items.items()}

    def process(self, records):
        for r in records:
            r["knowledge"] = [{"entity": k.key, "type": self.table[k.key]["type"],
                               "context_id": self.table[k.key]["first"]} for k in self.table_keys(r)]
        return records


def write_dataset(root: Path, n: int) -> Path:
    """n tweets; tweet i mentions ``E{i % 7}`` and ``F{i % 3}`` (so entities repeat across shards)."""
    (root / "txt").mkdir(parents=True)
    (root / "xml").mkdir()
    lines = []
    for i in range(n):
        lines += [f"IMGID:{2000 + i}", f"E{i % 7}\tB-PER", "meets\tO", f"F{i % 3}\tB-ORG", ""]
    (root / "txt" / "train.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


class PoolExecutor:
    """``pool`` in-process workers per stage, tasks run one per ``wait`` in FIFO or LIFO order (other shard orders),
    each on the next worker in turn. ``fail``: task -> how many times it raises first (-1: always)."""

    def __init__(self, plan, contexts, pool=1, lifo=False, fail=None):
        self.plan, self.contexts, self.pool, self.lifo = plan, contexts, pool, lifo
        self.fail = dict(fail or {})
        self.workers: dict[tuple[int, int], ShardProcessor] = {}
        self.queue: deque = deque()
        self.turn = 0
        self.ran: list = []

    def submit(self, task):
        if len(self.queue) >= self.pool * 2:
            return False
        self.queue.append(task)
        return True

    def wait(self, timeout):
        task = self.queue.pop() if self.lifo else self.queue.popleft()
        ident = ("unit", task.stage, task.unit) if isinstance(task, TableTask) else ("shard", task.stage, task.shard)
        self.ran.append(ident)
        left = self.fail.get(ident, 0)
        if left:
            self.fail[ident] = left - 1
            return [ShardOutcome(task, error=RuntimeError(f"worker died on {ident}"))]
        self.turn = (self.turn + 1) % self.pool
        key = (task.stage, self.turn)
        if key not in self.workers:
            s = self.plan.stages[task.stage]
            self.workers[key] = ShardProcessor(s.cls, s.config, self.contexts[task.stage])
        return [ShardOutcome(task, stats=self.workers[key].run(task))]

    def in_flight(self):
        return len(self.queue)

    def starting(self, stage):
        return False

    def release(self, stage):
        for key in [k for k in self.workers if k[0] == stage]:
            self.workers.pop(key).close()


def plan_for(tmp_path, out, n=23, shard_size=4, units=3, pipeline=("passthrough", KEYED)):
    """``out``: a folder name under ``tmp_path``, or a bucket URL."""
    data = tmp_path / "data"
    if not data.exists():
        write_dataset(data, n)
    stages = ", ".join(f"'{p}'" for p in pipeline)
    out = out if "://" in out else tmp_path / out
    config = load_config(None, [f"run.output_dir='{out}'", f"run.shard_size={shard_size}",
                                f"source={{kind: twitter_gmner, path: {data}}}", f"pipeline=[{stages}]",
                                f"stages[{KEYED}].resources.table_units={units}"])
    plan = plan_run(config)
    ingest = run_ingest(plan.ingest, config.source, plan.output_dir / "cache", "r1")
    for s in plan.stages:
        s.dir.mkdir(parents=True, exist_ok=True)
    return plan, stage_contexts(plan, config, "r1", None), ingest["num_shards"]


def execute(plan, contexts, num_shards, **executor):
    BUILT.clear()
    ex = PoolExecutor(plan, contexts, **executor)
    progress = Scheduler(ShardBook(plan, num_shards), ex, 3).run()
    return progress, ex


def knowledge_by_id(plan) -> dict:
    return {r["id"]: r["knowledge"] for r in iter_committed_records(plan.stages[-1].dir)}


@pytest.fixture(autouse=True)
def _clear():
    BUILT.clear()
    yield
    BUILT.clear()


def test_each_key_once_and_the_same_result_whatever_the_sharding_order_and_pool(tmp_path):
    results = []
    for out, shard_size, pool, lifo, units in (("a", 4, 1, False, 3), ("b", 5, 2, True, 3), ("c", 3, 3, True, 5)):
        plan, ctx, n = plan_for(tmp_path, out, shard_size=shard_size, units=units)
        progress, ex = execute(plan, ctx, n, pool=pool, lifo=lifo)
        assert all(not p.failed for p in progress.values())
        assert Counter(BUILT) == Counter({f"E{i}": 1 for i in range(7)} | {f"F{i}": 1 for i in range(3)})
        assert sum(1 for r in ex.ran if r[0] == "unit") == units
        # every unit ran before any shard of the keyed stage
        first_shard = next(i for i, r in enumerate(ex.ran) if r[0] == "shard" and r[1] == 1)
        assert max(i for i, r in enumerate(ex.ran) if r[0] == "unit") < first_shard
        results.append(knowledge_by_id(plan))
    assert results[0] == results[1] == results[2] and len(results[0]) == 23
    assert results[0]["twitter-gmner-v2/train/2010"] == [
        {**results[0]["twitter-gmner-v2/train/2010"][0], "entity": "E3", "context_id": "twitter-gmner-v2/train/2003"},
        {**results[0]["twitter-gmner-v2/train/2010"][1], "entity": "F1", "context_id": "twitter-gmner-v2/train/2001"}]
    totals = stage_totals(plan.stages[-1].dir)
    assert totals["table_units"] == 5 and totals["table_keys"] == 10 and totals["counters"]["built"] == 10


def test_a_rerun_computes_nothing(tmp_path):
    plan, ctx, n = plan_for(tmp_path, "out")
    execute(plan, ctx, n, pool=2)
    before = knowledge_by_id(plan)
    progress, ex = execute(plan, ctx, n, pool=2)
    assert BUILT == [] and ex.ran == [] and knowledge_by_id(plan) == before


def test_a_failed_unit_is_retried_alone_and_an_interrupted_table_resumes(tmp_path):
    plan, ctx, n = plan_for(tmp_path, "out", units=3)
    progress, ex = execute(plan, ctx, n, fail={("unit", 1, 2): 1})
    assert not any(p.failed for p in progress.values()) and ex.ran.count(("unit", 1, 2)) == 2
    keyed = plan.stages[-1]
    # interrupted: unit 0 and every shard of the keyed stage lost their markers
    tdir = table_dir(keyed.dir)
    unit_marker_path(tdir, 0).unlink()
    for i in committed_indices(keyed.dir):
        marker_path(keyed.dir, i).unlink()
    progress, ex = execute(plan, ctx, n)
    assert [r for r in ex.ran if r[0] == "unit"] == [("unit", 1, 0)]  # only the missing unit
    assert sorted(BUILT) == sorted(k for k in [f"E{i}" for i in range(7)] + [f"F{i}" for i in range(3)]
                                   if unit_of(k, 3) == 0)
    assert len(knowledge_by_id(plan)) == 23


def test_a_unit_that_keeps_failing_fails_the_stage_and_what_follows(tmp_path):
    plan, ctx, n = plan_for(tmp_path, "out", pipeline=(KEYED, "passthrough"))
    progress, ex = execute(plan, ctx, n, fail={("unit", 0, 1): -1})
    assert len(progress[KEYED].failed) == n and "keyed table unit 1 failed" in progress[KEYED].failed[0][1]
    assert len(progress["passthrough"].failed) == n
    assert not any(r[0] == "shard" for r in ex.ran)
    # the next run retries it and completes, reusing the units that were committed
    progress, ex = execute(plan, ctx, n)
    assert not any(p.failed for p in progress.values())
    assert [r for r in ex.ran if r[0] == "unit"] == [("unit", 0, 1)]


def test_a_changed_input_rebuilds_the_table_and_voids_the_stage(tmp_path):
    plan, ctx, n = plan_for(tmp_path, "out")
    execute(plan, ctx, n)
    upstream, keyed = plan.stages
    marker_path(upstream.dir, 2).unlink()  # shard 2 of the input is recomputed in the next run
    progress, ex = execute(plan, ctx, n)
    assert sorted(BUILT) == sorted([f"E{i}" for i in range(7)] + [f"F{i}" for i in range(3)])
    assert sorted(r[2] for r in ex.ran if r[:2] == ("shard", 1)) == list(range(n))  # every keyed shard redone
    assert len(knowledge_by_id(plan)) == 23


def test_an_upstream_shard_that_fails_for_good_fails_the_keyed_stage_for_the_run(tmp_path):
    plan, ctx, n = plan_for(tmp_path, "out")
    progress, ex = execute(plan, ctx, n, fail={("shard", 0, 3): -1})
    assert [s for s, _ in progress["passthrough"].failed] == [3]
    failed = progress[KEYED].failed
    assert sorted(s for s, _ in failed) == list(range(n)) and BUILT == []
    assert any("needs the whole input" in why for _, why in failed)
    progress, ex = execute(plan, ctx, n)  # the rerun heals it
    assert not any(p.failed for p in progress.values()) and len(knowledge_by_id(plan)) == 23


def test_collect_items_picks_the_lowest_rank_then_record_id_whatever_the_order():
    recs = [{"id": "r3", "k": [("a", 0)]}, {"id": "r1", "k": [("a", 1), ("b", 0)]}, {"id": "r2", "k": [("a", 0)]}]

    def keys(r):
        return [TableKey(k, {"from": r["id"]}, rank) for k, rank in r["k"]]

    for order in (recs, recs[::-1]):
        assert collect_items(keys, order) == {"a": {"from": "r2"}, "b": {"from": "r1"}}
    assert set(collect_items(keys, recs, unit=unit_of("a", 4), units=4)) == {"a"} | (
        {"b"} if unit_of("b", 4) == unit_of("a", 4) else set())


def test_the_keyed_example_in_writing_a_stage_runs():
    import re

    from gmner_pipeline.schema import empty_record
    from gmner_pipeline.testing import run_stage

    doc = (Path(__file__).resolve().parents[2] / "docs" / "writing-a-stage.md").read_text(encoding="utf-8")
    section = doc.split("## Keyed tables", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace = {"Stage": Stage, "TableKey": TableKey}
    exec(code, namespace)  # noqa: S102 - our own documentation
    recs = [empty_record(id=f"s/train/{i}", source="s", text="x", entities=[
        {"text": name, "start": 0, "end": 1, "type": "PER", "fine_type": None, "boxes": []}])
        for i, name in ((3, "Ada"), (1, "Ada"), (2, "Alan"))]
    out = run_stage(namespace["LengthOfEntity"], recs)
    assert [r["knowledge"][0]["context_id"] for r in out] == ["s/train/1", "s/train/1", "s/train/2"]


# --- robustness: units are committed, checked, watched and repaired like shards -------------------------------------

FLAKY: set[str] = set()  # keys FlakyKeyed fails transiently (an endpoint down while it asked about them)
FLAKY_KEYED = "test_keyed_table:FlakyKeyed"


class FlakyKeyed(KeyedEcho):
    """KeyedEcho whose keys in ``FLAKY`` fail with a transient error; a record that needs one fails transiently."""

    name = "flaky_keyed"

    def build_table(self, items):
        values = super().build_table(items)
        for k in set(values) & FLAKY:
            values[k] = {"status": "error", "error_kind": "transient", "error": "endpoint down"}
        return values

    def process(self, records):
        from gmner_pipeline.stage import mark_error

        out = []
        for r in records:
            failed = [k.key for k in self.table_keys(r) if self.table[k.key].get("status") == "error"]
            if failed:
                out.append(mark_error(r, self.name, f"no value for {failed}", transient=True))
            else:
                out.extend(super().process([r]))
        return out


def test_a_damaged_unit_is_built_again_and_unit_markers_record_file_and_input(tmp_path):
    from gmner_pipeline.keyed import check_unit, input_fingerprint, unit_path

    plan, ctx, n = plan_for(tmp_path, "out", units=3)
    execute(plan, ctx, n)
    upstream, keyed = plan.stages
    tdir = table_dir(keyed.dir)
    marker, problem = check_unit(tdir, 1)
    assert problem is None and marker["file"]["rows"] == marker["keys"] and marker["file"]["bytes"] > 0
    assert marker["input_commit"] == input_fingerprint(upstream.dir, n) and marker["commit_id"]
    unit_path(tdir, 1).write_bytes(unit_path(tdir, 1).read_bytes()[:-10])  # truncated after its commit
    assert "bytes" in check_unit(tdir, 1)[1]
    for i in committed_indices(keyed.dir):  # the stage's shards must run again, so the table is needed
        marker_path(keyed.dir, i).unlink()
    progress, ex = execute(plan, ctx, n)
    assert not any(p.failed for p in progress.values())
    assert [r for r in ex.ran if r[0] == "unit"] == [("unit", 1, 1)]  # only the damaged unit
    assert check_unit(tdir, 1)[1] is None and len(knowledge_by_id(plan)) == 23


def test_transient_key_failures_are_repaired_by_a_rerun_key_by_key(tmp_path):
    FLAKY.clear()
    FLAKY.add("E3")
    try:
        plan, ctx, n = plan_for(tmp_path, "out", units=3, pipeline=("passthrough", FLAKY_KEYED))
        execute(plan, ctx, n)
    finally:
        FLAKY.clear()
    keyed = plan.stages[-1]
    records = {r["id"]: r for r in iter_committed_records(keyed.dir)}
    bad = sorted(i for i, r in records.items() if r["status"] == "error")
    assert bad == [f"twitter-gmner-v2/train/{2000 + i}" for i in range(23) if i % 7 == 3]
    assert all(records[i]["error_kind"] == "transient" for i in bad)
    # --redo-errors none: nothing is redone
    BUILT.clear()
    ex = PoolExecutor(plan, ctx)
    Scheduler(ShardBook(plan, n, "none"), ex, 3).run()
    assert ex.ran == [] and BUILT == []
    # the default: only E3's unit is repaired (only E3 computed again), then only the shards holding its records
    BUILT.clear()
    ex = PoolExecutor(plan, ctx)
    progress = Scheduler(ShardBook(plan, n), ex, 3).run()
    assert not any(p.failed for p in progress.values())
    units = keyed.config.resources.table_units
    assert [r for r in ex.ran if r[0] == "unit"] == [("unit", 1, unit_of("E3", units))] and BUILT == ["E3"]
    assert sorted(r[2] for r in ex.ran if r[0] == "shard") == [i // 4 for i in (3, 10, 17)]
    assert progress[FLAKY_KEYED].repaired_now == 3 and progress[FLAKY_KEYED].records_redone == 3
    after = {r["id"]: r for r in iter_committed_records(keyed.dir)}
    assert all(r["status"] == "ok" for r in after.values()) and len(after) == 23
    assert {i: r for i, r in after.items() if i not in bad} == {i: r for i, r in records.items() if i not in bad}
    ex = PoolExecutor(plan, ctx)
    Scheduler(ShardBook(plan, n), ex, 3).run()
    assert ex.ran == []  # nothing left to repair


def test_the_watchdog_ends_a_stuck_unit_as_a_shard():
    import os
    import tempfile

    from gmner_pipeline.keyed import TableRef
    from gmner_pipeline.scheduler import Watchdog
    from gmner_pipeline.shards import beat_path

    with tempfile.TemporaryDirectory() as tdir:
        task = TableTask(1, 2, TableRef(tdir, 3), tdir, 4)
        now = [0.0]
        dog = Watchdog(None, 10.0, clock=lambda: now[0])
        assert dog.stuck([task]) == []  # not started: no beat file yet
        beat_path(tdir, 2).write_bytes(b"")
        assert dog.stuck([task]) == []
        now[0] = 5.0
        os.utime(beat_path(tdir, 2), ns=(1, 1))  # a batch done: progress
        assert dog.stuck([task]) == []
        now[0] = 16.0
        stuck = dog.stuck([task])
        assert [t for t, _ in stuck] == [task] and "no progress" in stuck[0][1]


def test_a_keyed_stage_runs_under_the_local_executor_end_to_end(tmp_path):
    import json

    from gmner_pipeline.keyed import check_unit
    from gmner_pipeline.runner import run

    data = write_dataset(tmp_path / "data", 11)
    config = load_config(None, [f"run.output_dir={tmp_path / 'out'}", "run.shard_size=4", "run.executor=local",
                                f"source={{kind: twitter_gmner, path: {data}}}", f"pipeline=['passthrough', '{KEYED}']",
                                f"stages[{KEYED}].resources.table_units=2"])
    result = run(config)
    assert result.ok and not result.failed and result.stages[KEYED].units_done == 2
    tdir = table_dir(result.plan.stages[-1].dir)
    assert all(check_unit(tdir, u)[1] is None for u in range(2))
    assert len(knowledge_by_id(result.plan)) == 11 and Counter(BUILT) == Counter(
        {f"E{i}": 1 for i in range(7)} | {f"F{i}": 1 for i in range(3)})
    latest = json.loads((tmp_path / "out" / "latest.json").read_text())
    assert not Path(latest["final_dir"]).is_absolute()
    BUILT.clear()
    again = run(config)  # a rerun computes nothing
    assert again.ok and BUILT == [] and again.stages[KEYED].processed_now == 0


FLAKY_UP: set[int] = set()  # tweet numbers FlakyUpstream fails transiently
FLAKY_UPSTREAM = "test_keyed_table:FlakyUpstream"


class FlakyUpstream(Stage):
    """A stage before a keyed one whose records in ``FLAKY_UP`` fail transiently (an endpoint down)."""

    name = "flaky_upstream"
    reads = frozenset()
    writes = frozenset()

    def process(self, records):
        from gmner_pipeline.stage import mark_error

        return [mark_error(r, self.name, "endpoint down", transient=True)
                if int(r["id"].rsplit("/", 1)[1]) - 2000 in FLAKY_UP else r for r in records]


def test_an_input_repaired_upstream_rebuilds_the_table_before_the_keyed_repairs(tmp_path):
    FLAKY_UP.clear()
    FLAKY_UP.update(i for i in range(23) if i % 7 == 3)  # the only tweets that mention E3
    try:
        plan, ctx, n = plan_for(tmp_path, "out", units=3, pipeline=(FLAKY_UPSTREAM, KEYED))
        execute(plan, ctx, n)
    finally:
        FLAKY_UP.clear()
    first = knowledge_by_id(plan)
    assert "E3" not in BUILT and sum(1 for r in iter_committed_records(plan.stages[-1].dir)
                                     if r["status"] == "error") == 3
    progress, ex = execute(plan, ctx, n)  # the endpoint is back: upstream repairs, then the keyed stage's
    assert not any(p.failed for p in progress.values())
    assert progress[FLAKY_UPSTREAM].repaired_now == 3 and progress[KEYED].repaired_now == 3
    assert "E3" in BUILT  # the table was rebuilt from the repaired input
    last_upstream = max(i for i, r in enumerate(ex.ran) if r[:2] == ("shard", 0))
    first_unit = min(i for i, r in enumerate(ex.ran) if r[0] == "unit")
    first_keyed = min(i for i, r in enumerate(ex.ran) if r[:2] == ("shard", 1))
    assert last_upstream < first_unit < first_keyed  # repairs upstream, then the table, then the keyed repairs
    after = {r["id"]: r for r in iter_committed_records(plan.stages[-1].dir)}
    assert all(r["status"] == "ok" for r in after.values())
    assert after["twitter-gmner-v2/train/2010"]["knowledge"][0]["entity"] == "E3"
    assert {i: k for i, k in knowledge_by_id(plan).items() if first[i]} == {i: k for i, k in first.items() if k}
    progress, ex = execute(plan, ctx, n)
    assert ex.ran == []  # nothing left to do


@pytest.fixture(scope="module")
def bucket():
    """A local S3 server (moto, support/s3.py) with one bucket."""
    pytest.importorskip("moto.server", reason="moto[server] (the dev extra) runs the local S3 server")
    from support.s3 import moto_bucket

    with moto_bucket() as b:
        yield b


def test_a_table_and_its_stage_in_a_bucket_each_key_once_and_a_rerun_computes_nothing(tmp_path, bucket):
    plan, ctx, n = plan_for(tmp_path, bucket.url("keyed"), units=3)
    progress, ex = execute(plan, ctx, n, pool=2)
    assert all(not p.failed for p in progress.values())
    assert Counter(BUILT) == Counter({f"E{i}": 1 for i in range(7)} | {f"F{i}": 1 for i in range(3)})
    before = knowledge_by_id(plan)
    assert len(before) == 23
    names = bucket.keys("keyed/")
    assert sum(1 for k in names if "/_table/unit-" in k and k.endswith(".done.json")) == 3
    assert not [k for k in names if ".tmp" in k]
    progress, ex = execute(plan, ctx, n, pool=2)
    assert BUILT == [] and ex.ran == [] and knowledge_by_id(plan) == before
