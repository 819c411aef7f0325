"""The runner on a real local Ray instance and in-process (``run.executor: local``): pipelining, reuse through stage
keys, and exactly-once under kills, crashes, failing shards and stopped workers. The cases that do not depend on Ray
run against both executors."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import session_processes, write_gmner_dataset
from gmner_pipeline import runner
from gmner_pipeline.config import load_config
from gmner_pipeline.latest import load_latest
from gmner_pipeline.shards import SHARD_GLOB, committed_indices, read_markers, read_records
from gmner_pipeline.testing.chaos import own_ray_workers

pytestmark = pytest.mark.integration
PLUGIN = "gmner_pipeline.stages.passthrough:PassthroughStage"  # the same stage under a second name


@pytest.fixture(params=["ray", "local"])
def executor(request) -> str:
    """Each executor in turn (the Ray one on the session's local Ray instance)."""
    if request.param == "ray":
        request.getfixturevalue("ray_local")
    return request.param


def config(tmp_path: Path, n: int = 24, shard_size: int = 5, executor: str = "ray", **stage_opts):
    data = write_gmner_dataset(tmp_path / "data", n)
    raw = {
        "run": {"output_dir": str(tmp_path / "out"), "shard_size": shard_size, "progress": False,
                "executor": executor},
        "source": {"kind": "twitter_gmner", "path": str(data)},
        "pipeline": ["passthrough", PLUGIN],
        "stages": {"passthrough": stage_opts, PLUGIN: {}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def final_ids(stage_dir: Path) -> Counter:
    ids: Counter = Counter()
    for path in stage_dir.glob(SHARD_GLOB):
        ids.update(r["id"] for r in read_records(path, columns=["id"]))
    return ids


def expected_ids(n: int) -> Counter:
    return Counter(f"twitter-gmner-v2/train/{1000 + i}" for i in range(n))


def test_two_stages_rerun_and_partial_recompute(tmp_path, executor):
    path = config(tmp_path, executor=executor)
    result = runner.run(load_config(str(path)))
    assert result.ok and result.ingest["num_shards"] == 5
    first, second = result.plan.stages
    assert final_ids(second.dir) == expected_ids(24)
    assert [result.stages[s.name].processed_now for s in result.plan.stages] == [5, 5]
    # a stage's rate covers its own work: it neither decays after the run nor counts the time later stages took
    rates = [result.stages[s.name].records_per_s for s in result.plan.stages]
    time.sleep(0.3)
    assert [result.stages[s.name].records_per_s for s in result.plan.stages] == rates
    assert result.stages[first.name].finished <= result.stages[second.name].finished
    out = tmp_path / "out"
    assert (out / "config.yaml").is_file() and json.loads((out / "latest.json").read_text())["ok"]

    again = runner.run(load_config(str(path)))  # unchanged config: nothing recomputed
    assert [again.stages[s.name].processed_now for s in again.plan.stages] == [0, 0]

    changed = runner.run(load_config(str(path), [f"stages[{PLUGIN}].batch_size=2"]))  # only the 2nd stage changes
    assert [changed.stages[s.name].processed_now for s in changed.plan.stages] == [0, 5]
    assert changed.plan.stages[0].dir == first.dir and changed.plan.stages[1].dir != second.dir
    assert final_ids(changed.plan.stages[1].dir) == expected_ids(24)


def _actor_workers() -> list[psutil.Process]:
    """This session's stage actors (below this process): never another user's Ray workers on a shared machine."""
    return own_ray_workers()


def test_killing_a_worker_mid_run_loses_and_duplicates_nothing(tmp_path, ray_local):
    cfg = load_config(str(config(tmp_path, n=30, shard_size=3, sleep_per_record=0.05)))
    plan_dir = tmp_path / "out" / "passthrough"
    killed: list[int] = []

    def killer() -> None:
        deadline = time.time() + 60
        while time.time() < deadline and not killed:
            dirs = list(plan_dir.glob("*"))
            if dirs and len(committed_indices(dirs[0])) >= 2:
                for proc in _actor_workers():
                    proc.kill()
                    killed.append(proc.pid)
                    break
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    result = runner.run(cfg)
    thread.join(timeout=5)
    assert killed, "the test never saw a stage worker to kill"
    assert result.ok, result.failed
    final = result.plan.stages[-1].dir
    assert len(committed_indices(final)) == 10
    assert final_ids(final) == expected_ids(30)  # every record exactly once


def test_a_shard_that_keeps_crashing_is_reported_and_the_rest_completes(tmp_path, ray_local):
    path = config(tmp_path, n=12, shard_size=4, crash_ids=["twitter-gmner-v2/train/1005"])
    cfg = load_config(str(path), ["run.shard_attempts=2", "run.actor_restarts=0"])
    result = runner.run(cfg)
    assert not result.ok
    assert [(stage, shard) for stage, shard, _ in result.failed] == [("passthrough", 1), (PLUGIN, 1)]
    assert committed_indices(result.plan.stages[-1].dir) == {0, 2}
    # the rerun (crash removed) picks up exactly the missing shard
    fixed = runner.run(load_config(str(path), ["stages.passthrough.crash_ids=[]"]))
    assert fixed.ok


def test_a_failing_shard_is_retried_then_reported_and_the_rest_completes(tmp_path, executor):
    """A shard whose stage fails as a whole (a bug, not a bad record): retried alone; once it works on the retry, the
    run is complete; when it keeps failing it is reported with what it would have fed, and the rerun finishes it."""
    once = config(tmp_path / "once", n=12, shard_size=4, executor=executor, abort_ids=["twitter-gmner-v2/train/1005"],
                  once_dir=str(tmp_path / "flags"))
    result = runner.run(load_config(str(once)))
    assert result.ok and [sh for sh, _ in result.stages["passthrough"].retried] == [1]
    assert final_ids(result.plan.final_dir) == expected_ids(12)

    path = config(tmp_path, n=12, shard_size=4, executor=executor, abort_ids=["twitter-gmner-v2/train/1005"])
    result = runner.run(load_config(str(path), ["run.shard_attempts=2"]))
    assert not result.ok
    assert [(stage, shard) for stage, shard, _ in result.failed] == [("passthrough", 1), (PLUGIN, 1)]
    assert "told to abort" in result.failed[0][2]
    fixed = runner.run(load_config(str(path), ["stages.passthrough.abort_ids=[]"]))  # a new key: a fresh folder
    assert fixed.ok and final_ids(fixed.plan.final_dir) == expected_ids(12)


@pytest.mark.timeout(240)
def test_a_stopped_worker_times_out_and_its_shard_is_retried(tmp_path, ray_local):
    """A worker that stops (SIGSTOP) mid-shard stalled the run forever; the watchdog ends it after
    ``run.stall_timeout_s`` without a finished batch, and the shard is retried and reported."""
    frozen = "twitter-gmner-v2/train/1006"
    path = config(tmp_path, n=12, shard_size=4, freeze_ids=[frozen], once_dir=str(tmp_path / "flags"), batch_size=2,
                  resources={"max_in_flight": 1})
    before = {p.pid for p in _actor_workers()}
    t0 = time.monotonic()
    result = runner.run(load_config(str(path), ["run.stall_timeout_s=3", "pipeline=[passthrough]"]))
    assert result.ok and time.monotonic() - t0 < 200
    (shard, reason), = result.stages["passthrough"].retried
    assert shard == 1 and "no progress" in reason and "stall_timeout_s=3" in reason
    assert final_ids(result.plan.final_dir) == expected_ids(12)
    time.sleep(1)
    stopped = []
    for proc in _actor_workers():
        with contextlib.suppress(psutil.Error):
            if proc.pid not in before and proc.status() == psutil.STATUS_STOPPED:
                stopped.append(proc.pid)
    assert stopped == []  # the stopped worker was killed, not left behind


@pytest.mark.parametrize("executor_name", ["ray", "local"])
def test_killing_the_driver_then_rerunning_gives_every_record_once(tmp_path, executor_name):
    """kill -9 of the driver mid-run: no worker commits afterwards (they check the driver's lock before committing),
    nothing of the run survives it (the reaper ends Ray's processes), and the rerun gives every record once."""
    path = config(tmp_path, n=40, shard_size=4, executor=executor_name, sleep_per_record=0.05,
                  resources={"pool_size": 2})
    cli = [sys.executable, "-m", "gmner_pipeline.cli", "run", "--config", str(path)]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(cli, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    stage_root = tmp_path / "out" / "passthrough"
    left: list[psutil.Process] = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            dirs = list(stage_root.glob("*"))
            if dirs and len(committed_indices(dirs[0])) >= 2:
                break
            assert proc.poll() is None, "the run ended before it could be interrupted"
            time.sleep(0.05)
        else:
            pytest.fail("no shard was committed within 120 s")
        os.kill(proc.pid, signal.SIGKILL)
        killed_at = time.time()
        proc.wait(timeout=10)
        while (left := session_processes(proc.pid)) and time.time() < killed_at + 15:
            time.sleep(0.2)
    finally:
        for orphan in session_processes(proc.pid):
            orphan.kill()
    assert left == [], [" ".join(p.cmdline())[:80] for p in left if p.is_running()]  # nothing of the run outlives it
    markers = read_markers(next(stage_root.glob("*")))
    late = {i: round(m["committed_at"] - killed_at, 2) for i, m in markers.items() if m["committed_at"] > killed_at + 1.5}
    assert late == {}  # no worker committed after its driver was gone (1.5 s: a loaded machine's scheduling)
    done_before = len(markers)
    assert done_before < 10

    rerun = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    latest = load_latest(tmp_path / "out")
    assert latest["stages"]["passthrough"]["shards_processed_now"] == 10 - done_before
    final = Path(latest["final_dir"])
    assert len(committed_indices(final)) == 10
    assert final_ids(final) == expected_ids(40)
    assert not [p for p in final.iterdir() if ".tmp-" in p.name]


@pytest.mark.timeout(120)
def test_a_pool_larger_than_the_cluster_still_finishes(tmp_path, ray_local):
    # 3 actors of 1 CPU on a 2-CPU Ray: the third is never placed, so no shard may wait on it (it used to hang forever)
    path = config(tmp_path, n=12, shard_size=2, resources={"num_cpus": 1, "pool_size": 3, "max_in_flight": 1})
    result = runner.run(load_config(str(path), ["pipeline=[passthrough]"]))
    assert result.ok and len(committed_indices(result.plan.final_dir)) == 6
    assert final_ids(result.plan.final_dir) == expected_ids(12)


CLOSE_PROBE = '''
from pathlib import Path
from gmner_pipeline.stages.passthrough import PassthroughStage

class ClosingStage(PassthroughStage):
    def close(self):
        (Path(self.context.output_dir) / f"closed-{id(self)}").write_text("x")
'''


def test_the_runner_closes_each_stage_instance(tmp_path):
    # Stage.close() releases resources and logs the stage's stats (annotate, retrieve, LLM clients): the runner
    # must call it in every actor before ending the pool, not just kill the process.
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "closeprobe.py").write_text(CLOSE_PROBE)
    path = config(tmp_path, n=4, shard_size=2)
    raw = yaml.safe_load(path.read_text())
    raw.update(pipeline=["closeprobe:ClosingStage"],
               stages={"closeprobe:ClosingStage": {"resources": {"pool_size": 2}}})
    path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(tmp_path / "probe")}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "gmner_pipeline.cli", "run", "--config", str(path)], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    workers = {m["pid"] for m in read_markers(load_latest(tmp_path / "out")["final_dir"]).values()}
    assert len(list((tmp_path / "out").glob("closed-*"))) >= len(workers) >= 1  # each instance that worked


def test_a_recomputed_upstream_shard_is_recomputed_downstream(tmp_path, executor):
    # Deleting an upstream shard (to redo it) must not leave the downstream shard made from the old one: with a
    # stage that is not deterministic (web retrieval, sampled LLM) it would no longer match its input.
    path = config(tmp_path, n=12, shard_size=4, executor=executor)
    first = runner.run(load_config(str(path)))
    up, down = first.plan.stages
    for suffix in (".parquet", ".done.json"):
        (up.dir / f"shard-00001{suffix}").unlink()
    again = runner.run(load_config(str(path)))
    assert again.ok and [again.stages[s.name].processed_now for s in again.plan.stages] == [1, 1]
    recs = read_records(down.dir / "shard-00001.parquet")
    assert {r["lineage"][-2]["run_id"] for r in recs} == {r["lineage"][-1]["run_id"] for r in recs} == {again.run_id}
    assert final_ids(down.dir) == expected_ids(12)
