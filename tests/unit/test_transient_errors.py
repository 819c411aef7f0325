"""Transient is not permanent: a record that failed because the endpoint was down carries ``error_kind: transient``,
and a rerun redoes exactly those records (the shard rewritten whole, every record once), then the records that
passed through later stages as errors; permanent errors stay unless asked (``run.redo_errors``). The LLM stage is
the test-only ``AskTeacherStage`` against the in-process ``FakeOpenAI``; runs use the in-process executor (the Ray
path runs the same worker code: tests/integration/test_runner.py)."""

from __future__ import annotations

from collections import Counter

import pytest

from conftest import write_gmner_dataset
from gmner_pipeline import runner
from gmner_pipeline.config import load_config
from gmner_pipeline.llm.request import BAD_REQUEST, EXHAUSTED, INTERNAL, LLMResult, MALFORMED
from gmner_pipeline.shards import iter_committed_records, read_markers
from gmner_pipeline.stage import TransientError, error_kind_of
from gmner_pipeline.testing import Fault, FakeOpenAI

ASK = "gmner_pipeline.testing.stages:AskTeacherStage"
N = 12
REFUSED = {"Alice Smith visits Paris #3", "Alice Smith visits Paris #8"}  # the server answers these with a 400


class Switch:
    """The endpoint: down (503 for everything) until ``up``; two prompts are always refused (400, permanent)."""

    def __init__(self):
        self.up = False

    def __call__(self, body, index):
        text = body["messages"][-1]["content"]
        if text in REFUSED:
            return Fault.status_code(400, message="context too long")
        return None if self.up else Fault.status_code(503, message="overloaded")


def config(tmp_path, srv, *sets):
    data = write_gmner_dataset(tmp_path / "data", N)
    teacher = (f"{{endpoints: [{{base_url: '{srv.base_url}', model: fake-model}}], "
               "retry: {max_attempts: 2, initial_backoff_s: 0, jitter_s: 0, max_total_s: 5}, "
               "circuit: {failure_threshold: 100}}")
    return load_config(None, [
        f"run.output_dir={tmp_path / 'out'}", "run.shard_size=4", "run.progress=false", "run.executor=local",
        f"source={{kind: twitter_gmner, path: {data}}}", f"pipeline=['{ASK}', passthrough]",
        f"llm={{roles: {{teacher: {teacher}}}, cache: {{path: '{tmp_path / 'cache.sqlite'}'}}}}", *sets])


def final(result) -> list[dict]:
    return list(iter_committed_records(result.plan.final_dir))


def test_the_error_kind_comes_from_the_client_and_from_exceptions():
    assert [LLMResult(error="x", error_kind=k).transient for k in (EXHAUSTED, MALFORMED, BAD_REQUEST, INTERNAL)] == \
        [True, True, False, False]
    assert not LLMResult().transient
    assert [error_kind_of(e) for e in (TransientError("later"), TimeoutError(), ConnectionResetError(),
                                       MemoryError(), RuntimeError("CUDA out of memory. Tried to allocate"),
                                       ValueError("bad box"))] == ["transient"] * 5 + ["permanent"]


def test_a_rerun_redoes_only_the_transient_errors_once_the_endpoint_is_back(tmp_path):
    switch = Switch()
    with FakeOpenAI(fault_fn=switch) as srv:
        cfg = config(tmp_path, srv)
        down = runner.run(cfg)  # the endpoint is down for every batch
        recs = final(down)
        assert Counter(r["error_kind"] for r in recs) == {"transient": N - 2, "permanent": 2}
        assert all(r["error_stage"] == "ask_teacher" for r in recs)
        assert not down.ok and "ended in error" in down.problems[0]  # the error share is the runner's verdict now
        ask, _ = down.plan.stages
        assert sum(m["new_errors_transient"] for m in read_markers(ask.dir).values()) == N - 2

        switch.up = True
        calls = srv.calls
        up = runner.run(cfg)
        assert srv.calls - calls == N - 2  # only the transient ones were sent again
        assert up.ok
        assert [up.stages[s.name].processed_now for s in up.plan.stages] == [0, 0]
        assert [up.stages[s.name].repaired_now for s in up.plan.stages] == [3, 3]
        assert [up.stages[s.name].records_redone for s in up.plan.stages] == [N - 2, N - 2]
        recs = final(up)
        assert Counter(r["id"] for r in recs) == Counter(f"twitter-gmner-v2/train/{1000 + i}" for i in range(N))
        assert Counter(r["status"] for r in recs) == {"ok": N - 2, "error": 2}
        assert {r["text"] for r in recs if r["status"] == "error"} == REFUSED
        for r in recs:  # the repaired records went through the later stage too
            if r["status"] == "ok":
                assert [e["stage"] for e in r["lineage"]] == ["ask_teacher", "passthrough"]
                assert r["knowledge"][0]["knowledge"] == f"echo: {r['text']}"
        markers = read_markers(up.plan.final_dir)
        assert all(len(m["replaces"]) == 1 for m in markers.values())

        calls = srv.calls
        again = runner.run(cfg)  # nothing transient left: nothing sent, nothing rewritten
        assert srv.calls == calls and [again.stages[s.name].repaired_now for s in again.plan.stages] == [0, 0]

        calls = srv.calls
        everything = runner.run(config(tmp_path, srv, "run.redo_errors=all"))
        assert srv.calls - calls == 2 and everything.stages[ASK].records_redone == 2


def test_redo_errors_none_keeps_committed_errors(tmp_path):
    switch = Switch()
    with FakeOpenAI(fault_fn=switch) as srv:
        runner.run(config(tmp_path, srv))
        switch.up = True
        calls = srv.calls
        kept = runner.run(config(tmp_path, srv, "run.redo_errors=none"))
        assert srv.calls == calls
        assert Counter(r["error_kind"] for r in final(kept)) == {"transient": N - 2, "permanent": 2}


@pytest.mark.parametrize("mode, redone", [("transient", 0), ("all", 2)])
def test_a_stage_exception_is_classified(tmp_path, mode, redone):
    """A record whose stage call raises a ValueError is a permanent error: redone with `all` only."""
    data = write_gmner_dataset(tmp_path / "data", 4)
    sets = [f"run.output_dir={tmp_path / 'out'}", "run.shard_size=4", "run.progress=false", "run.executor=local",
            "run.max_error_share=1", f"source={{kind: twitter_gmner, path: {data}}}", "pipeline=[passthrough]",
            "stages.passthrough.fail_ids=['twitter-gmner-v2/train/1001', 'twitter-gmner-v2/train/1002']"]
    first = runner.run(load_config(None, sets))
    kinds = {r["id"]: r["error_kind"] for r in final(first) if r["status"] == "error"}
    assert set(kinds.values()) == {"permanent"}
    again = runner.run(load_config(None, [*sets, f"run.redo_errors={mode}"]))
    assert again.stages["passthrough"].records_redone == redone
