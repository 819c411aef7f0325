"""grpo_filter through the real runner: Ray actors sampling a scripted policy over HTTP, then the published
dataset/D2_filtered, reports/grpo_filter.{json,png} and the end-of-run summary; and `gmner-pipeline run grpo_filter`
through the CLI with the embedded llama.cpp server (SmolLM2) as the policy."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import write_gmner_dataset
from gmner_pipeline import runner
from gmner_pipeline.config import load_config
from gmner_pipeline.latest import load_latest
from gmner_pipeline.shards import iter_committed_records
from support.grpo import ScriptedPolicy

pytestmark = pytest.mark.integration

# every tweet of write_gmner_dataset(with_xml_every=1): "Alice Smith visits Paris #i", Alice Smith boxed, Paris not
FULL = "<think>Both are named.</think><answer>Alice Smith|PER|[10,5,50,70]; Paris|LOC|None</answer>"  # reward 1
HALF = "<think>One is named.</think><answer>Alice Smith|PER|[10,5,50,70]</answer>"  # 0.5
NONE = "<think>Nothing.</think><answer>None</answer>"  # 0
INFORMATIVE = [FULL, FULL, FULL, NONE, NONE, NONE, HALF, HALF]  # median 0.5, max 1, std 0.43: kept
TOO_EASY = [FULL] * 8  # std 0: low_std


def script(prompt: str) -> list[str]:
    index = int(re.search(r"Paris #(\d+)", prompt).group(1))
    return INFORMATIVE if index % 2 == 0 else TOO_EASY


def test_a_run_keeps_the_informative_d2_records_and_writes_the_report(tmp_path, ray_local):
    data = write_gmner_dataset(tmp_path / "data", 16, with_xml_every=1)
    with ScriptedPolicy(script) as srv:
        cfg = {"run": {"output_dir": str(tmp_path / "out"), "shard_size": 4, "progress": False},
               "source": {"kind": "twitter_gmner", "path": str(data)},
               "pipeline": ["template_cot", "grpo_filter"],
               "stages": {"grpo_filter": {"prompt": {"image": False}, "resources": {"pool_size": 2}}},
               "llm": {"roles": {"policy": {"endpoints": [srv.endpoint(max_concurrency=4).model_dump()]}},
                       "cache": {"path": str(tmp_path / "llm-cache.sqlite")}}}
        (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
        result = runner.run(load_config(str(tmp_path / "run.yaml")))
        assert result.ok
        records = list(iter_committed_records(result.plan.final_dir))
        d2 = [r for r in records if r["cot"]["split"] == "D2"]
        assert srv.calls == len(d2) > 0  # one request (n = 8) per D2 record, none for D1
        again = runner.run(load_config(str(tmp_path / "run.yaml")))  # a rerun recomputes nothing, still reports
        assert again.ok and again.stages["grpo_filter"].processed_now == 0 and srv.calls == len(d2)
    kept = sorted(r["id"] for r in d2 if r["grpo"]["keep"])
    expected = sorted(r["id"] for r in d2 if int(r["text"].split("#")[-1]) % 2 == 0)
    assert kept == expected and all(r["grpo"]["reason"] == "low_std" for r in d2 if r["id"] not in expected)
    assert all(r["grpo"] is None for r in records if r["cot"]["split"] == "D1")

    out = tmp_path / "out"
    published = pq.read_table(out / "dataset" / "D2_filtered").column("id").to_pylist()
    assert sorted(published) == expected
    report = json.loads((out / "reports" / "grpo_filter.json").read_text())
    assert (report["items"], report["kept"]) == (len(d2), len(expected))
    assert report["dropped_by_first_rule"]["low_std"] == len(d2) - len(expected)
    assert (out / "reports" / "grpo_filter.png").is_file()
    latest = json.loads((out / "latest.json").read_text())
    assert latest["dataset"]["D2_filtered"] == len(expected)
    assert latest["reports"]["grpo_filter"]["kept"] == len(expected)
    assert result.reports["grpo_filter"]["summary"].startswith(f"kept {len(expected)} of {len(d2)} groups")
    assert again.reports["grpo_filter"]["kept"] == len(expected)


def test_cli_run_grpo_filter_with_the_embedded_policy(tmp_path):
    """The bundled sample_grpo config, G and max_tokens cut further so the test stays short; SmolLM2 is untrained, so
    the assertions are about the plumbing: complete groups, rewards in [0, 1], the report and the summary."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "COLUMNS": "200"}
    env.pop("RAY_ADDRESS", None)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "gmner_pipeline.cli", "run", "grpo_filter", "--config", "sample_grpo", "-o", str(out),
         "--set", "stages.grpo_filter.samples=2", "--set", "stages.grpo_filter.max_tokens=8",
         "--set", "run.progress=false", "--set", f"llm.cache.path={tmp_path / 'cache.sqlite'}"],
        env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = Path(load_latest(out)["final_dir"])
    records = list(iter_committed_records(final))
    groups = [r for r in records if r["grpo"]]
    assert groups and len(groups) == sum(r["cot"]["split"] == "D2" for r in records)
    for r in groups:
        assert r["status"] == "ok" and len(r["grpo"]["responses"]) == 2 and all(r["grpo"]["responses"])
        assert all(0.0 <= x <= 1.0 for x in r["grpo"]["rewards"])
        assert r["lineage"][-1]["model_ids"][0].startswith("smollm2-135m-instruct@")
    report = json.loads((out / "reports" / "grpo_filter.json").read_text())
    assert report["items"] == len(groups) and report["responses"] == 2 * len(groups)
    assert "grpo_filter: kept" in proc.stderr and "D2_filtered" in proc.stderr
