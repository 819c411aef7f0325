"""distill through the real runner (local Ray, Parquet shards, the CLI): a new teacher recomputes distill and nothing
before it, the old teacher's folder stays, ``status`` and ``teachers`` show both, and dev/test records never reach
``<output>/dataset`` even when their held-out chains are written. Also the embedded SmolLM2 teacher through
``gmner-pipeline run distill``."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from conftest import write_gmner_dataset
from gmner_pipeline.answer import gold_triples, parse_answer, same_triples
from gmner_pipeline.cli import app
from gmner_pipeline.latest import load_latest
from gmner_pipeline.testing import FakeOpenAI

pytestmark = pytest.mark.integration

THINK = "The sentence names a person and a city; the picture shows the person, not the city, so only one box."


def copying_teacher(body, index):
    content = body["messages"][1]["content"]
    text = content if isinstance(content, str) else next(p["text"] for p in content if p["type"] == "text")
    labels = re.search(r"Annotation to explain: (.*)", text).group(1)
    return f"<think>{THINK}</think><answer>{labels}</answer>"


def run_cli(*args: str):
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


def test_a_new_teacher_recomputes_distill_only_and_dev_test_never_reach_the_dataset(tmp_path, ray_local):
    data = write_gmner_dataset(tmp_path / "data", 12, split="train")
    write_gmner_dataset(data, 6, split="test")
    out = tmp_path / "out"
    with FakeOpenAI("teacher-a", reply_fn=copying_teacher) as a, FakeOpenAI("teacher-b", reply_fn=copying_teacher) \
            as b:
        def sets(teacher: FakeOpenAI) -> list[str]:
            items = [f"source={{kind: twitter_gmner, path: {data}, splits: [train, test]}}",
                     "pipeline=[passthrough, distill]", f"run.output_dir={out}", "run.shard_size=6",
                     "stages.distill.styles=[template, llm]", "stages.distill.heldout_chains=true",
                     "stages.distill.llm.routes=[question_answer]",
                     f"llm.roles.teacher.endpoints=[{{base_url: '{teacher.base_url}', model: {teacher.model}}}]",
                     f"llm.cache.path={tmp_path / 'cache.sqlite'}"]
            return [x for item in items for x in ("--set", item)]

        run_cli("run", "synthesize", *sets(a))
        first = json.loads((out / "latest.json").read_text())
        run_cli("run", "synthesize", *sets(b))
        second = json.loads((out / "latest.json").read_text())
        assert a.calls == 18 and b.calls == 18  # one request per record (12 train + 6 test, one route)
    # the teacher changed: distill and nothing before it
    assert second["stages"]["passthrough"]["shards_processed_now"] == 0
    assert second["stages"]["distill"]["shards_processed_now"] == 3
    keys = {run["stage"]: run["key"] for run in first["chain"]}, {run["stage"]: run["key"] for run in second["chain"]}
    assert keys[0]["passthrough"] == keys[1]["passthrough"] and keys[0]["distill"] != keys[1]["distill"]
    assert (out / "distill" / keys[0]["distill"]).is_dir()  # the old teacher's shards stay
    status = run_cli("status", str(out)).output
    assert keys[1]["distill"][:10] in status and "llm:consistent: 18" in status

    comparison = json.loads(run_cli("teachers", str(out), "--json").output)
    versions = {v["version"].split("@")[0]: v for v in comparison["versions"]}
    assert set(versions) == {"template:template", "llm:teacher-a", "llm:teacher-b"}
    assert versions["llm:teacher-a"]["records"] == versions["llm:teacher-b"]["records"] == 18
    assert versions["template:template"]["folders"] == [keys[0]["distill"], keys[1]["distill"]]
    pair = next(p for p in comparison["pairs"] if "teacher-a" in p["a"] + p["b"] and "teacher-b" in p["a"] + p["b"])
    assert pair["share_both_consistent"] == 1.0

    # held-out chains were written for the test records, and none of those records reached the dataset
    published = [r for split in ("D1", "D2") for f in sorted((out / "dataset" / split).glob("*.parquet"))
                 for r in pq.read_table(f).to_pylist()]
    assert len(published) == 12 and {r["split"] for r in published} == {"train"}
    final = [r for f in sorted((out / "distill" / keys[1]["distill"]).glob("shard-*.parquet"))
             for r in pq.read_table(f).to_pylist()]
    test_records = [r for r in final if r["split"] == "test"]
    assert len(test_records) == 6 and all(r["cot"]["split"] is None for r in test_records)
    assert all(c["heldout"] for r in test_records for c in r["cot"]["chains"])


def test_run_synthesize_with_template_llm_and_mllm_styles(tmp_path, ray_local):
    """The whole stage through `run synthesize` on the bundled sample (real photos): a text teacher and a multimodal
    teacher in Qwen2.5-VL's frame, both answering in their frames; every chain consistent, stored in original pixels."""
    out = tmp_path / "out"
    with FakeOpenAI("text-teacher", reply_fn=copying_teacher) as text, \
            FakeOpenAI("vl-teacher", reply_fn=copying_teacher) as vl:
        items = ["pipeline=[distill]", f"run.output_dir={out}", "source.limit=4",
                 "stages.distill.styles=[template, llm, mllm]",
                 "stages.distill.llm.routes=[question_answer, few_conclusions]",  # the default run's fast setting: one
                 f"llm.roles.teacher.endpoints=[{{base_url: '{text.base_url}', model: text-teacher}}]",
                 f"llm.roles.vlm_teacher.endpoints=[{{base_url: '{vl.base_url}', model: vl-teacher}}]",
                 "llm.roles.vlm_teacher.frame={kind: qwen2_5_vl}", f"llm.cache.path={tmp_path / 'cache.sqlite'}"]
        run_cli("run", "synthesize", *[x for item in items for x in ("--set", item)])
        images = [p for s in vl.seen for p in s.body["messages"][1]["content"] if p["type"] == "image_url"]
    assert len(images) == 4 and all(i["image_url"]["url"].startswith("data:image/jpeg;base64,") for i in images)
    latest = load_latest(out)
    folder = Path(next(e["dir"] for e in latest["chain"] if e["stage"] == "distill"))
    records = [r for f in sorted(folder.glob("shard-*.parquet")) for r in pq.read_table(f).to_pylist()]
    by_style = {}
    for rec in records:
        for chain in rec["cot"]["chains"]:
            by_style.setdefault(chain["style"], []).append(chain)
    assert {k: len(v) for k, v in by_style.items()} == {"template": 8, "llm": 8, "mllm": 4}
    assert all(c["consistent"] for chains in by_style.values() for c in chains)
    assert {c["frame"] for c in by_style["mllm"]} == {"qwen2_5_vl"} and {c["model_id"] for c in by_style["mllm"]} \
        == {"vl-teacher"}
    for rec in records:  # the stored answers are the gold triples, in original pixels
        for chain in rec["cot"]["chains"]:
            assert same_triples(parse_answer(chain["answer"]).triples, gold_triples(rec)), chain["answer"]


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="the embedded server needs the llm extra")
def test_embedded_smollm2_teacher_through_run_distill(tmp_path, ray_local):
    out = tmp_path / "out"
    result = run_cli("run", "distill", "--output", str(out), "--set", "source.limit=3", "--set",
                     "stages.distill.llm.routes=[question_answer]", "--set",
                     "llm.roles.teacher.sampling={max_tokens: 48, seed: 0}", "--set",
                     f"llm.cache.path={tmp_path / 'cache.sqlite'}")
    assert "distill" in result.output
    latest = load_latest(out)
    folder = Path(next(e["dir"] for e in latest["chain"] if e["stage"] == "distill"))
    records = [r for f in sorted(folder.glob("shard-*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert len(records) == 3 and all(r["status"] == "ok" for r in records)
    llm_chains = [c for r in records for c in r["cot"]["chains"] if c["style"] == "llm"]
    assert len(llm_chains) == 3
    for chain in llm_chains:  # a real model wrote them: judged, costed, and (SmolLM2 being tiny) mostly rejected
        assert chain["model_id"].startswith("smollm2-135m-instruct@")
        assert chain["prompt_tokens"] > 100 and chain["completion_tokens"] > 0
        assert chain["consistent"] or chain["rejection"].split(":")[0] in {
            "truncated", "unparsable", "wrong_answer", "short_think", "leaks_labels"}
    status = run_cli("status", str(out)).output
    assert "llm:chains: 3" in status and "template:consistent: 6" in status
