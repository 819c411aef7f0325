"""An LLM-driven stage through the real runner (Ray actors, a real HTTP server in this process): the typed LLM context
reaches the workers, aprocess runs there, lineage carries the role's identity, and max_concurrency bounds the requests
in flight to the endpoint across all the actors of the run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import write_gmner_dataset
from gmner_pipeline.latest import load_latest
from gmner_pipeline.shards import iter_committed_records, read_markers
from gmner_pipeline.testing import FakeOpenAI

pytestmark = pytest.mark.integration

PLUGIN = '''
from gmner_pipeline.llm.request import LLMRequest
from gmner_pipeline.stage import Stage


class AskStage(Stage):
    name = "ask"
    reads = frozenset()
    writes = frozenset({"knowledge"})

    @classmethod
    def llm_roles(cls, config):
        return {"teacher"}

    async def aprocess(self, records):
        client = self.llm.client("teacher")
        results = await client.acomplete_many(
            [LLMRequest(messages=[{"role": "user", "content": r["text"]}]) for r in records])
        for record, res in zip(records, results):
            record["knowledge"] = [{"entity": "x", "type": "PER", "fine_type": None, "knowledge": res.text,
                                    "answers": [], "voted": None, "cache_key": res.cache_key}]
            self.usage(record, results=[res])
        return records
'''


def test_an_llm_stage_runs_on_ray_with_the_run_wide_concurrency_bound(tmp_path):
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "askprobe.py").write_text(PLUGIN)
    data = write_gmner_dataset(tmp_path / "data", 12)
    with FakeOpenAI(model="fake-model", delay_s=0.2) as srv:
        cfg = {"run": {"output_dir": str(tmp_path / "out"), "shard_size": 3, "progress": False},
               "source": {"kind": "twitter_gmner", "path": str(data)},
               "pipeline": ["askprobe:AskStage"],
               "stages": {"askprobe:AskStage": {"batch_size": 3,
                                                "resources": {"num_cpus": 0.5, "pool_size": 2, "max_in_flight": 1}}},
               "llm": {"roles": {"teacher": {"endpoints": [{"base_url": srv.base_url, "model": "fake-model",
                                                            "max_concurrency": 2}], "revision": "r7"}},
                       "cache": {"path": str(tmp_path / "llm-cache.sqlite")}}}
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(tmp_path / "probe")}
        env.pop("RAY_ADDRESS", None)
        proc = subprocess.run([sys.executable, "-m", "gmner_pipeline.cli", "run", "--config", str(tmp_path / "c.yaml")],
                              env=env, capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert srv.calls == 12
        assert srv.max_in_flight <= 2  # 2 actors, 1 request each: the endpoint's bound holds for the whole run
    final = Path(load_latest(tmp_path / "out")["final_dir"])
    records = list(iter_committed_records(final))
    assert len(records) == 12
    for rec in records:
        assert rec["knowledge"][0]["knowledge"] == f"echo: {rec['text']}"
        assert rec["lineage"][-1]["model_ids"] == ["fake-model@r7"] and rec["lineage"][-1]["completion_tokens"] == 3
    requests = sum(m["llm"]["teacher"]["requests"] for m in read_markers(final).values())
    assert requests >= 12  # each marker carries its worker's running totals
