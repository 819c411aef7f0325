"""Chaos with real servers: two llama.cpp replicas (SmolLM2) behind one role, an LLM stage on Ray, and during the run
a kill -9 of one replica, a SIGSTOP of the other past the request timeout (then SIGCONT), and a kill of a Ray worker.
The run completes, every record comes out once and answered, and the stats show the failovers and retries.

About a minute here (two servers, Ray, 24 short requests); ``benchmarks/chaos_soak.py`` is the long version."""

from __future__ import annotations

import importlib.util
import json
import logging
import threading
import time
from collections import Counter

import pytest

from conftest import write_gmner_dataset
from gmner_pipeline import runner
from gmner_pipeline.config import load_config
from gmner_pipeline.shards import committed_indices, iter_committed_records
from gmner_pipeline.summary import stage_totals
from gmner_pipeline.testing.chaos import Replicas, own_ray_workers

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                 reason="llama-cpp-python is not installed: pip install -e '.[llm]'")]
ASK = "gmner_pipeline.testing.stages:AskTeacherStage"
N = 24
TIMEOUT_S = 3.0  # per request attempt


def chaos_config(tmp_path, replicas: Replicas):
    data = write_gmner_dataset(tmp_path / "data", N)
    teacher = {"endpoints": replicas.endpoints(max_concurrency=2), "model_id": "smollm2-chaos",
               "timeout_s": TIMEOUT_S, "connect_timeout_s": 1.0,
               "sampling": {"max_tokens": 4, "temperature": 0.0},
               "retry": {"max_attempts": 60, "initial_backoff_s": 0.2, "max_backoff_s": 1.0, "jitter_s": 0.1,
                         "max_total_s": 150},
               "circuit": {"failure_threshold": 1, "cooldown_s": 0.5, "max_cooldown_s": 2.0}}
    return load_config(None, [
        f"run.output_dir={tmp_path / 'out'}", "run.shard_size=3", "run.progress=false",
        f"source={{kind: twitter_gmner, path: {data}}}", f"pipeline=['{ASK}']",
        f"stages[{ASK}]={{batch_size: 3, resources: {{num_cpus: 0.5, pool_size: 2, max_in_flight: 1}}}}",
        "llm=" + json.dumps({"roles": {"teacher": teacher}, "cache": {"path": str(tmp_path / "llm-cache.sqlite")}})])


@pytest.mark.timeout(420)
def test_a_run_survives_a_killed_replica_a_stopped_replica_and_a_killed_worker(tmp_path, ray_local):
    with Replicas(2) as replicas:
        cfg = chaos_config(tmp_path, replicas)
        stage_root = tmp_path / "out" / ASK
        done: list[str] = []

        def committed() -> int:
            dirs = list(stage_root.glob("*"))
            return len(committed_indices(dirs[0])) if dirs else 0

        def wait_for(n: int) -> None:
            deadline = time.monotonic() + 240
            while committed() < n and time.monotonic() < deadline and not result:
                time.sleep(0.05)

        def chaos() -> None:
            wait_for(1)
            replicas.kill(0)
            done.append("replica 0 killed")
            wait_for(3)
            replicas.pause(1)
            time.sleep(TIMEOUT_S + 2)  # past the request timeout: the requests in flight to it time out
            replicas.resume(1)
            done.append("replica 1 stopped and resumed")
            wait_for(5)
            workers = own_ray_workers()
            if workers:
                workers[0].kill()
                done.append("ray worker killed")

        result: list = []
        thread = threading.Thread(target=chaos, daemon=True)
        thread.start()
        result.append(runner.run(cfg))
        thread.join(timeout=30)
        run = result[0]

    assert done == ["replica 0 killed", "replica 1 stopped and resumed", "ray worker killed"], done
    assert run.ok, (run.failed, run.problems)
    records = list(iter_committed_records(run.plan.final_dir))
    assert Counter(r["id"] for r in records) == Counter(f"twitter-gmner-v2/train/{1000 + i}" for i in range(N))
    assert Counter(r["status"] for r in records) == {"ok": N}, [r["error"] for r in records if r["error"]][:3]
    assert all(r["knowledge"][0]["knowledge"] is not None for r in records)
    llm = stage_totals(run.plan.final_dir)["llm"]["teacher"]
    logging.getLogger(__name__).warning("chaos: %s; llm: %s", done, {k: llm[k] for k in ("requests", "retries", "failovers")})
    assert llm["failovers"] >= 1 and llm["retries"] >= 1, llm  # the stats show what the replicas went through
    assert set(llm["by_endpoint"]) <= {e["base_url"] for e in cfg.llm.role("teacher").model_dump()["endpoints"]}
