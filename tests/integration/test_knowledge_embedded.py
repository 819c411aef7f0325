"""``gmner-pipeline run knowledge`` end to end with the embedded llama.cpp server (SmolLM2-135M-Instruct) as every
role: generators, voter and summary, on a real local Ray; then ``status``, ``show`` and ``view`` display the answers,
the vote and the summary, and a rerun makes no call. Kept small (two entities, one aspect, short answers): SmolLM2
generates ~20 tokens/s on 2 cores."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from gmner_pipeline.cli import app
from gmner_pipeline.latest import load_latest
from gmner_pipeline.shards import iter_committed_records

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                 reason="llama-cpp-python is not installed: pip install -e '.[llm]'")]
cli = CliRunner()


def write_tweets(root: Path) -> None:
    (root / "txt").mkdir(parents=True)
    (root / "xml").mkdir()
    tweets = [["Kevin\tB-PER", "Love\tI-PER", "scores\tO"], ["Kevin\tB-PER", "Love\tI-PER", "visits\tO", "Paris\tB-LOC"],
              ["Paris\tB-LOC", "again\tO"]]
    lines = []
    for i, tokens in enumerate(tweets):
        lines += [f"IMGID:{4000 + i}", *tokens, ""]
    (root / "txt" / "train.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_run_knowledge_with_the_embedded_server_then_show_and_view(tmp_path, ray_local):
    write_tweets(tmp_path / "data")
    config = {
        "run": {"output_dir": str(tmp_path / "out"), "shard_size": 2, "progress": False},
        "source": {"kind": "twitter_gmner", "path": str(tmp_path / "data")},
        "pipeline": ["knowledge"],
        "stages": {"knowledge": {"generators": ["knowledge_gen_1", "knowledge_gen_2"], "max_aspects": 1,
                                 "generator_max_tokens": 48, "voter_max_tokens": 64, "summary_max_tokens": 24,
                                 "summary_words": 15, "resources": {"num_cpus": 0.25, "table_units": 2}}},
        "llm": {"cache": {"path": str(tmp_path / "cache.sqlite")},
                "roles": {"knowledge_gen_1": {"sampling": {"temperature": 0.7, "seed": 1}},
                          "knowledge_gen_2": {"sampling": {"temperature": 0.7, "seed": 2}}}},
    }
    path = tmp_path / "knowledge.yaml"
    path.write_text(yaml.safe_dump(config))
    result = cli.invoke(app, ["run", "knowledge", "--config", str(path)])
    assert result.exit_code == 0, result.output
    latest = load_latest(tmp_path / "out")
    assert latest["stages"]["knowledge"]["table_units"] == [2, 2]
    records = list(iter_committed_records(latest["final_dir"]))
    assert len(records) == 3
    items = {k["entity"]: k for r in records for k in r["knowledge"]}
    assert set(items) == {"Kevin Love", "Paris"}
    for item in items.values():  # two generators, SmolLM2 each time, with tokens per call
        assert [a["role"] for a in item["answers"]] == ["knowledge_gen_1", "knowledge_gen_2"]
        assert all(a["model_id"].startswith("smollm2-135m-instruct@") for a in item["answers"])
        assert item["tokens"][0]["prompt_tokens"] > 100 and item["status"] in {"ok", "no_agreement", "error"}
        assert all(a["ok"] for a in item["answers"]), item["answers"]  # json_object + schema holds SmolLM2 to JSON
    # the same entity in two tweets is one entry: identical items, asked once
    kevin = [k for r in records for k in r["knowledge"] if k["entity"] == "Kevin Love"]
    assert len(kevin) == 2 and kevin[0] == kevin[1] and kevin[0]["context_id"] == "twitter-gmner-v2/train/4000"

    status = cli.invoke(app, ["status", str(tmp_path / "out")])
    assert status.exit_code == 0 and "knowledge" in status.output
    record_id = "twitter-gmner-v2/train/4001"
    show = cli.invoke(app, ["show", str(tmp_path / "out"), record_id], terminal_width=200)
    assert show.exit_code == 0 and "knowledge: Kevin Love (PER)" in show.output and "answers" in show.output
    assert "knowledge: Paris (LOC)" in show.output and "summary:" in show.output
    view = cli.invoke(app, ["view", str(tmp_path / "out")])
    assert view.exit_code == 0, view.output
    chunks = "".join(p.read_text() for p in (tmp_path / "out" / "view" / "index_files").glob("records-*.js"))
    assert chunks.count('"answers":[{"role":"knowledge_gen_1"') == 4  # every entity shows its generators' answers

    cache_before = (tmp_path / "cache.sqlite").stat().st_size
    again = cli.invoke(app, ["run", "knowledge", "--config", str(path)])
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "out" / "latest.json").read_text())["stages"]["knowledge"][
        "shards_processed_now"] == 0  # a rerun computes nothing, so it asks nothing
    assert (tmp_path / "cache.sqlite").stat().st_size == cache_before
