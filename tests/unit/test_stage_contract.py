"""The stage contract (docs/writing-a-stage.md): what the framework hands a stage, what it adds, the lifecycle, LLM
access on one event loop per worker, the order check of the plan, and the test harness."""

from __future__ import annotations

import asyncio

import pytest

from gmner_pipeline.config import ConfigError, load_config
from gmner_pipeline.llm.config import LLMConfig
from gmner_pipeline.llm.request import LLMRequest
from gmner_pipeline.llm.services import divide_concurrency
from gmner_pipeline.plan import plan_run
from gmner_pipeline.schema import STATUS_DROPPED, STATUS_ERROR, empty_record
from gmner_pipeline.stage import Stage, StageConfig, StageContext, StageContractError, mark_dropped
from gmner_pipeline.testing import FakeOpenAI, run_stage
from gmner_pipeline.worker import ShardProcessor


def recs(n: int, **fields) -> list[dict]:
    return [empty_record(id=f"s/train/{i}", source="s", split="train", text=f"text {i}", tokens=["text", str(i)],
                         **fields) for i in range(n)]


class Recorder(Stage):
    """Remembers what it was handed; drops one record; reports usage for another."""

    name = "recorder"
    reads = frozenset()
    writes = frozenset()
    seen: list[list[str]] = []
    events: list[str] = []

    def setup(self):
        self.events.append("setup")
        self.prompt_hash = "p123"
        self.model_ids = ["default-model"]

    def accepts(self, record):
        return record["id"] != "s/train/3"

    def process(self, records):
        self.seen.append([r["id"] for r in records])
        for r in records:
            if r["id"] == "s/train/1":
                mark_dropped(r, self.name, "boring")
            if r["id"] == "s/train/2":
                self.usage(r, model_ids=["judge@1"], prompt_tokens=7, completion_tokens=3, seconds=0.5)
                self.usage(r, prompt_tokens=1)
        return records

    def close(self):
        self.events.append("close")


def test_the_framework_hands_over_active_accepted_records_and_writes_the_lineage():
    Recorder.seen, Recorder.events = [], []
    inputs = recs(5)
    inputs[4].update(status=STATUS_ERROR, error="upstream", error_stage="ingest")
    out = run_stage(Recorder, inputs, context={"run_id": "r9", "stage_key": "k1"}, batch_size=10)
    assert Recorder.seen == [["s/train/0", "s/train/1", "s/train/2"]]  # not the failed one, not the refused one
    assert Recorder.events == ["setup", "close"]
    by_id = {r["id"]: r for r in out}
    assert [r["id"] for r in out] == [r["id"] for r in inputs]
    assert by_id["s/train/3"]["lineage"] == [] and by_id["s/train/4"]["lineage"] == []  # passed through untouched
    assert by_id["s/train/4"]["error"] == "upstream"
    first = by_id["s/train/0"]["lineage"][-1]
    assert (first["stage"], first["run_id"], first["stage_key"], first["prompt_hash"], first["model_ids"]) == (
        "recorder", "r9", "k1", "p123", ["default-model"])
    assert by_id["s/train/1"]["status"] == STATUS_DROPPED and by_id["s/train/1"]["lineage"][-1]["stage"] == "recorder"
    used = by_id["s/train/2"]["lineage"][-1]
    assert (used["model_ids"], used["prompt_tokens"], used["completion_tokens"]) == (["judge@1"], 8, 3)
    assert used["seconds"] == pytest.approx(0.5)


class Loses(Stage):
    name = "loses"

    def process(self, records):
        return records[1:]


class ReturnsNothing(Stage):
    name = "returns_nothing"

    def process(self, records):
        for r in records:
            r["text"] = "changed"


def test_a_stage_that_loses_records_fails_loudly_instead_of_committing():
    with pytest.raises(StageContractError, match="exactly once"):
        run_stage(Loses, recs(3))
    with pytest.raises(StageContractError, match="must return the list"):
        run_stage(ReturnsNothing, recs(2))


class WritesJunk(Stage):
    name = "writes_junk"

    def process(self, records):
        for r in records:
            r["knowledge"] = "not a list of items"
        return records


def test_the_harness_checks_the_output_against_the_record_schema():
    with pytest.raises(Exception, match="(?i)list|struct|convert"):
        run_stage(WritesJunk, recs(1))


# --- LLM access: one loop per worker, roles sharing it, limits per server -------------------------------------------

class FanOut(Stage):
    """Two generators per record, concurrently across the batch, then a summary from the second role."""

    name = "fan_out"

    @classmethod
    def llm_roles(cls, config):
        return {"gen", "judge"}

    async def aprocess(self, records):
        gen, judge = self.llm.client("gen"), self.llm.client("judge")
        assert gen._loop is judge._loop and asyncio.get_running_loop() is gen._loop.loop  # one loop, shared

        async def one(record):
            drafts = await gen.acomplete_many([LLMRequest(messages=[{"role": "user", "content": f"{record['text']} #{k}"}])
                                               for k in range(2)])
            verdict = await judge.acomplete(LLMRequest(messages=[{"role": "user", "content": drafts[0].text}]))
            self.usage(record, results=[*drafts, verdict])
            record["error"] = verdict.text  # a visible trace of the answer, for the test
            return record

        return list(await asyncio.gather(*(one(r) for r in records)))


def test_aprocess_fans_out_across_records_on_one_loop_with_one_limit_per_server(tmp_path):
    with FakeOpenAI(model="m", delay_s=0.2) as srv:
        endpoint = {"base_url": srv.base_url, "model": "m", "max_concurrency": 2}
        llm = {"roles": {"gen": {"endpoints": [endpoint]}, "judge": {"endpoints": [endpoint], "revision": "v2"}},
               "cache": {"path": str(tmp_path / "cache.sqlite")}}
        out = run_stage(FanOut, recs(6), llm=llm)
        assert srv.max_in_flight == 2  # concurrency across records, and the two roles share the server's 2 slots
        assert srv.calls == 18
    for rec in out:
        assert rec["error"].startswith("echo: echo: text")
        lineage = rec["lineage"][-1]
        assert lineage["model_ids"] == ["m", "m@v2"] and lineage["prompt_tokens"] > 0  # the roles' identities


class BlocksOnItsOwnLoop(Stage):
    name = "blocks"

    @classmethod
    def llm_roles(cls, config):
        return {"gen"}

    async def aprocess(self, records):
        self.llm.client("gen").complete(LLMRequest(messages=[{"role": "user", "content": "x"}]))
        return records


def test_a_blocking_call_inside_aprocess_is_an_error_not_a_hang(tmp_path):
    with FakeOpenAI(model="m") as srv:
        llm = {"roles": {"gen": {"endpoints": [{"base_url": srv.base_url, "model": "m"}]}},
               "cache": {"enabled": False}}
        out = run_stage(BlocksOnItsOwnLoop, recs(1), llm=llm)
    assert out[0]["status"] == STATUS_ERROR and "await client.acomplete" in out[0]["error"]


def test_undeclared_roles_are_refused():
    stage = Recorder(StageConfig(), StageContext())
    with pytest.raises(KeyError, match="not declared"):
        stage.llm.client("teacher")


def test_max_concurrency_is_divided_among_the_actors_that_call_the_endpoint():
    ep = lambda url, n: {"base_url": url, "model": "m", "max_concurrency": n}  # noqa: E731
    llm = LLMConfig.model_validate({"roles": {
        "gen": {"endpoints": [ep("http://a/v1", 16), ep("http://b/v1", 3)]},
        "judge": {"endpoints": [ep("http://a/v1", 16)]},
        "other": {"endpoints": [ep("http://c/v1", 8)]}}})
    per_actor = divide_concurrency(llm, [({"gen"}, 4), ({"judge"}, 2), ({"gen", "judge"}, 2)])
    limits = {(name, e.base_url): e.max_concurrency for name, role in per_actor.roles.items() for e in role.endpoints}
    assert limits[("gen", "http://a/v1")] == limits[("judge", "http://a/v1")] == 2  # 16 // 8 actors
    assert limits[("gen", "http://b/v1")] == 1  # 3 // 6 actors, at least 1
    assert limits[("other", "http://c/v1")] == 8  # nobody calls it: unchanged


# --- the lifecycle in a worker ----------------------------------------------------------------------------------------

def test_setup_runs_once_per_worker_and_close_after_the_last_shard(tmp_path):
    from gmner_pipeline.shards import write_records

    Recorder.seen, Recorder.events = [], []
    for i in range(2):
        write_records(tmp_path / f"in{i}.parquet", recs(4))
    proc = ShardProcessor(Recorder, StageConfig(batch_size=2), StageContext())
    proc.process(0, tmp_path / "in0.parquet", tmp_path / "out")
    proc.process(1, tmp_path / "in1.parquet", tmp_path / "out")
    proc.close()
    assert Recorder.events == ["setup", "close"] and len(Recorder.seen) == 4


# --- reads / writes: the plan checks the order before the run ---------------------------------------------------------

class NeedsKnowledge(Stage):
    name = "needs_knowledge"
    reads = frozenset({"knowledge"})
    writes = frozenset({"cot"})


def test_the_plan_refuses_an_order_that_cannot_provide_what_a_stage_reads(tmp_path):
    def plan(*sets):
        return plan_run(load_config(None, [f"run.output_dir={tmp_path}", *sets]))

    with pytest.raises(ConfigError, match="'annotate' reads image.*conll.*put 'retrieve' before it"):
        plan("source={kind: conll, path: x.conll}", "pipeline=[annotate]")
    with pytest.raises(ConfigError, match="twitter_gmner without source.image_dir"):
        plan("source={kind: twitter_gmner, path: x}", "pipeline=[annotate, template_cot]")
    with pytest.raises(ConfigError, match="NeedsKnowledge' reads knowledge"):
        plan("pipeline=['test_stage_contract:NeedsKnowledge']")
    assert [s.name for s in plan("pipeline=[annotate, template_cot]").stages] == ["annotate", "template_cot"]
    assert plan("source={kind: conll, path: x.conll}", "pipeline=[retrieve, annotate]").stages
    assert plan("source={kind: twitter_gmner, path: x, image_dir: y}", "pipeline=[annotate]").stages


def test_the_example_in_writing_a_stage_runs(tmp_path):
    # docs/writing-a-stage.md shows stage authors a complete stage: it must keep working as written
    import re
    from pathlib import Path

    from gmner_pipeline.llm import LLMRequest, user_message
    from gmner_pipeline.stage import mark_error

    doc = (Path(__file__).resolve().parents[2] / "docs" / "writing-a-stage.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    namespace = {"Stage": Stage, "LLMRequest": LLMRequest, "user_message": user_message, "mark_error": mark_error}
    exec(code, namespace)  # noqa: S102 - our own documentation
    with FakeOpenAI(model="teacher-model") as srv:
        srv.faults.append(__import__("gmner_pipeline.testing", fromlist=["Fault"]).Fault.status_code(400))
        llm = {"roles": {"teacher": {"endpoints": [{"base_url": srv.base_url, "model": "teacher-model"}]}},
               "cache": {"enabled": False}}
        out = run_stage(namespace["ShoutStage"], recs(3), llm=llm, batch_size=3)
    statuses = sorted(r["status"] for r in out)
    assert statuses == ["error", "ok", "ok"]
    for rec in out:
        if rec["status"] == "ok":
            assert rec["knowledge"][0]["knowledge"] == f"echo: {rec['text']}"
            assert rec["lineage"][-1]["model_ids"] == ["teacher-model"]
        else:
            assert "bad_request" in rec["error"]


# --- stage counters --------------------------------------------------------------------------------------------------

def test_counters_reach_the_commit_marker_once_per_kept_result(tmp_path):
    """``Stage.count`` events are summed per shard into the marker; a batch that raises and is redone record by
    record does not count its failed try, and a record that still raises counts as ``record_raised``."""
    from gmner_pipeline.schema import empty_record
    from gmner_pipeline.shards import read_markers, shard_path, write_records
    from gmner_pipeline.stage import Stage, StageConfig, StageContext
    from gmner_pipeline.summary import stage_totals
    from gmner_pipeline.worker import ShardProcessor

    class Counting(Stage):
        name, version = "counting", "1"

        def process(self, records):
            for r in records:
                self.count("seen")
                if r["id"] == "bad":
                    raise ValueError("bad record")
            return records

    records = [empty_record(id=i, source="t") for i in ("a", "b", "bad", "c")]
    write_records(shard_path(tmp_path / "in", 0), records)
    proc = ShardProcessor(Counting, StageConfig(batch_size=4), StageContext())
    proc.process(0, shard_path(tmp_path / "in", 0), tmp_path / "out")
    marker = read_markers(tmp_path / "out")[0]
    assert marker["counters"] == {"seen": 3, "record_raised": 1}
    assert stage_totals(tmp_path / "out")["counters"] == {"seen": 3, "record_raised": 1}
