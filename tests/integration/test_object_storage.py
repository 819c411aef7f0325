"""Outputs in an S3 bucket, for real: a local S3-compatible server (moto's server mode, a separate process started once
for this module) behind ``s3://bucket/prefix?endpoint_override=...&scheme=http``, reached through pyarrow's S3
filesystem exactly as a cluster reaches AWS, MinIO or Ceph.

What is checked here: the storage primitives and the commit protocol on objects (whole-object PUTs, the marker last,
a failed write leaves nothing), the bucket lock (exclusive create, a second run refused, a dead run's lock taken over),
the request cache in a bucket (also through a run's workers: a second run into another folder asks nothing), and the
CLI end to end: ``run synthesize`` into the bucket, ``status``/``show`` and the shard readers on it, nothing
recomputed or duplicated on a rerun, and a driver killed mid-run then resumed with every record exactly once. What is
not: real S3 or GCS (no network here), GCS at all (no emulator in this environment).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from conftest import session_processes
from gmner_pipeline.atomic import atomic_open
from gmner_pipeline.latest import load_latest
from gmner_pipeline.llm.cache import FileCache, open_cache
from gmner_pipeline.llm.config import CacheConfig
from gmner_pipeline.schema import empty_record
from gmner_pipeline.output_lock import ObjectLock, OutputLock, RunLockedError
from gmner_pipeline.shards import check_shard, commit_shard, committed_indices, committed_shards, is_committed, \
    marker_path, read_markers, read_records, shard_path, shard_problem, write_records
from gmner_pipeline.storage import ObjectPath, create_exclusive, location
from ray_cli import VENV_BIN, sample_ids
from support.s3 import moto_bucket

pytestmark = pytest.mark.integration
moto_server = pytest.importorskip("moto.server", reason="moto[server] (the dev extra) runs the local S3 server")
boto3 = pytest.importorskip("boto3")

BUCKET = "gmner-test"


@pytest.fixture(scope="module")
def bucket():
    """A moto S3 server on a free port with one empty bucket (support/s3.py)."""
    with moto_bucket(BUCKET) as b:
        yield b


@pytest.fixture(scope="module")
def s3(bucket):
    """``s3(prefix)``: the URL of a location in the test bucket."""
    return bucket.url


def rec(record_id: str) -> dict:
    return empty_record(id=record_id, source="s", split="train", text="t", tokens=["t"])


# --- primitives ----------------------------------------------------------------------------------------------------


def test_object_paths_and_the_commit_protocol(bucket, s3):
    root = location(s3("prims"))
    assert isinstance(root, ObjectPath) and root.bucket == BUCKET and root.object_key == "prims"
    assert not root.exists() and list(root.iterdir()) == []
    (root / "a" / "x.json").write_text('{"n": 1}')
    assert root.is_dir() and (root / "a").is_dir() and (root / "a" / "x.json").is_file()
    assert [p.name for p in root.iterdir()] == ["a"]
    assert [p.name for p in root.glob("*/*.json")] == ["x.json"]
    assert location(s3("prims/a")) == root / "a" and location(str(root / "a")) == root / "a"

    # a write that fails inside the block PUTs nothing: no torn object, nothing to clean up
    with pytest.raises(RuntimeError):
        with atomic_open(root / "torn.json", "w") as fh:
            fh.write("half")
            raise RuntimeError("killed mid-write")
    assert not (root / "torn.json").exists()

    # a shard is its data object, then its marker: data without a marker is not committed
    stage = root / "stage"
    write_records(shard_path(stage, 0), [rec("r0")])
    assert not is_committed(stage, 0) and committed_indices(stage) == set()
    commit_shard(stage, 0, {"records_in": 1})
    write_records(shard_path(stage, 1), [rec("r1")])  # a writer killed before its marker
    assert committed_indices(stage) == {0} and read_markers(stage)[0]["records_in"] == 1
    assert [r["id"] for p in committed_shards(stage) for r in read_records(p)] == ["r0"]
    assert bucket.keys("prims/stage/") == ["prims/stage/shard-00000.done.json", "prims/stage/shard-00000.parquet",
                                        "prims/stage/shard-00001.parquet"]
    assert marker_path(stage, 0).read_bytes()

    # the marker records the object's size and row count, checked through the store: a replaced object is damaged
    marker, problem = check_shard(stage, 0)
    assert problem is None and marker["file"] == {"bytes": shard_path(stage, 0).stat().st_size, "rows": 1}
    write_records(shard_path(stage, 0), [rec("r0"), rec("r0-again")])
    assert "bytes" in shard_problem(stage, 0) and committed_indices(stage) == set()


def test_exclusive_create_and_the_bucket_lock(s3):
    lock_obj = location(s3("locks/excl"))
    assert create_exclusive(lock_obj, b"a") is True
    assert create_exclusive(lock_obj, b"b") is False
    assert lock_obj.read_bytes() == b"a"

    out = s3("locks/out")
    first = OutputLock(out)
    assert isinstance(first, ObjectLock)
    with first:
        holder = json.loads(location(out).joinpath(".lock").read_text())
        assert holder["pid"] == os.getpid() and holder["token"] == first.token
        with pytest.raises(RunLockedError, match="another gmner-pipeline run"):
            with ObjectLock(location(out), ttl_s=30, wait_s=0.5):
                pass
    assert not (location(out) / ".lock").exists()  # released at the end

    # a killed run leaves its lock behind; the next run takes it over once it has not been renewed for ttl_s
    (location(out) / ".lock").write_text(json.dumps({"host": "gone", "pid": 1, "token": "dead", "heartbeat": 1.0}))
    t0 = time.monotonic()
    with ObjectLock(location(out), ttl_s=1.0) as taker:
        assert json.loads((location(out) / ".lock").read_text())["token"] == taker.token
    assert 1.0 <= time.monotonic() - t0 < 20


def test_the_request_cache_in_a_bucket(bucket, s3):
    cache = open_cache(CacheConfig(backend="files", path=s3("llm-cache")))
    assert isinstance(cache, FileCache)
    assert cache.get("ab" * 32) is None
    cache.put("ab" * 32, {"text": "answer"})
    assert cache.get("ab" * 32) == {"text": "answer"} and len(cache) == 1
    assert bucket.keys("llm-cache/") == [f"llm-cache/ab/{'ab' * 32}.json"]
    with pytest.raises(ValueError, match="backend=files"):
        CacheConfig(backend="sqlite", path=s3("llm-cache"))


# --- the CLI, end to end -------------------------------------------------------------------------------------------


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "GMNER_LOCK_TTL_S": "4", "COLUMNS": "250"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([str(VENV_BIN / "gmner-pipeline"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def write_config(tmp_path: Path, out: str, **extra) -> Path:
    raw = {"run": {"output_dir": out, "shard_size": 3, "progress": False},
           "source": {"kind": "sample"},
           "pipeline": ["template_cot"],
           "stages": {"template_cot": {"resources": {"num_cpus": 0.5, "pool_size": 2}}}}
    raw.update(extra)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def latest(out: str) -> dict:
    """The run summary with its folders resolved (they are written relative to the output folder)."""
    return load_latest(out)


def final_ids(out: str) -> Counter:
    final = location(latest(out)["final_dir"])
    assert isinstance(final, ObjectPath)
    return Counter(r["id"] for shard in committed_shards(final) for r in read_records(shard, columns=["id"]))


def test_run_synthesize_into_a_bucket_reads_back_and_reruns_exactly_once(bucket, s3, tmp_path):
    out = s3("runs/sample")
    config = write_config(tmp_path, out)
    first = cli("run", "synthesize", "--config", str(config))
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    assert not (tmp_path / "s3:").exists() and not Path("s3:").exists()  # nothing landed on a local "s3:" folder

    summary = latest(out)
    expected = Counter(sample_ids())
    num_shards = summary["ingest"]["num_shards"]
    assert num_shards == -(-sum(expected.values()) // 3)
    final = location(summary["final_dir"])
    assert sorted(read_markers(final)) == list(range(num_shards))
    assert final_ids(out) == expected
    assert summary["dataset"] and sum(summary["dataset"].values()) == sum(expected.values())
    names = bucket.keys("runs/sample/")
    assert "runs/sample/latest.json" in names and "runs/sample/config.yaml" in names
    assert not [n for n in names if ".tmp" in n] and "runs/sample/.lock" not in names
    assert any(n.startswith("runs/sample/dataset/D1/part-") for n in names)

    status = cli("status", out)
    assert status.returncode == 0, status.stderr[-2000:]
    assert "template_cot" in status.stdout and f"{num_shards}/{num_shards}" in status.stdout
    record_id = sorted(expected)[0]
    show = cli("show", out, record_id)
    assert show.returncode == 0, show.stderr[-2000:]
    assert record_id in show.stdout and "template" in show.stdout
    ids = cli("ids", out, "--limit", "0")
    assert ids.returncode == 0, ids.stderr[-2000:]
    assert sorted(ids.stdout.split()) == sorted(expected)
    card = cli("card", out)  # a command that needs a local folder says how to get one
    assert card.returncode == 2 and "aws s3 sync s3://" in " ".join(card.stderr.split())

    again = cli("run", "synthesize", "--config", str(config))
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    rerun = latest(out)
    assert rerun["run_id"] != summary["run_id"]
    assert rerun["stages"]["template_cot"]["shards_processed_now"] == 0
    assert final_ids(out) == expected
    assert len(bucket.keys("runs/sample/runs/")) == 4  # two runs, each its config.json and summary.json

    # the summary names its folders relative to the output (no endpoint in it)
    raw = json.loads((location(out) / "latest.json").read_text())
    assert raw["final_dir"] == "template_cot/" + location(rerun["final_dir"]).name

    # a shard object damaged after its commit (replaced by a shorter one) is found and redone by the next run
    damaged = committed_shards(location(rerun["final_dir"]))[1]
    damaged.write_bytes(damaged.read_bytes()[:-10])
    healed = cli("run", "synthesize", "--config", str(config))
    assert healed.returncode == 0, (healed.stdout + healed.stderr)[-4000:]
    assert latest(out)["stages"]["template_cot"]["shards_processed_now"] == 1
    assert final_ids(out) == expected


def test_a_missing_bucket_is_refused_before_anything_starts(s3, tmp_path):
    out = s3("x").replace(f"s3://{BUCKET}/", "s3://no-such-bucket/")
    result = cli("run", "synthesize", "--config", str(write_config(tmp_path, out)), timeout=120)
    assert result.returncode == 2
    assert "bucket 'no-such-bucket' does not exist" in " ".join(result.stderr.split())


def test_a_driver_killed_mid_run_resumes_with_every_record_once(bucket, s3, tmp_path):
    out = s3("runs/killed")
    # a slow first stage (1 s per record, one record per shard) so that the kill lands between commits
    config = write_config(tmp_path, out, pipeline=["passthrough", "template_cot"],
                          stages={"passthrough": {"sleep_per_record": 1.0, "resources": {"pool_size": 1}},
                                  "template_cot": {"resources": {"num_cpus": 0.5, "pool_size": 1}}})
    raw = yaml.safe_load(config.read_text())
    raw["run"]["shard_size"] = 1
    config.write_text(yaml.safe_dump(raw))
    expected = Counter(sample_ids())
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "GMNER_LOCK_TTL_S": "4"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([str(VENV_BIN / "gmner-pipeline"), "run", "synthesize", "--config", str(config)],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            done = [n for n in bucket.keys("runs/killed/passthrough/") if n.endswith(".done.json")]
            if len(done) >= 2:
                break
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.2)
        else:
            pytest.fail("no passthrough shard was committed within 180 s")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        for orphan in session_processes(proc.pid):  # the killed driver's local Ray processes
            orphan.kill()
    names = bucket.keys("runs/killed/")
    assert "runs/killed/latest.json" not in names and "runs/killed/.lock" in names  # killed: no summary, lock left
    done_before = len([n for n in names if n.startswith("runs/killed/passthrough/") and n.endswith(".done.json")])
    assert 2 <= done_before < len(expected)

    rerun = cli("run", "synthesize", "--config", str(config))  # takes over the dead run's lock after GMNER_LOCK_TTL_S
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-4000:]
    summary = latest(out)
    assert summary["stages"]["passthrough"]["shards_processed_now"] == len(expected) - done_before
    assert final_ids(out) == expected
    assert "runs/killed/.lock" not in bucket.keys("runs/killed/")


ASK_PLUGIN = '''
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
        results = await self.llm.client("teacher").acomplete_many(
            [LLMRequest(messages=[{"role": "user", "content": r["text"]}]) for r in records])
        for record, res in zip(records, results):
            record["knowledge"] = [{"entity": "x", "type": "PER", "fine_type": None, "knowledge": res.text,
                                    "answers": [], "voted": None, "cache_key": res.cache_key}]
        return records
'''


def test_the_request_cache_in_a_bucket_answers_a_second_run_through_the_workers(bucket, s3, tmp_path):
    from gmner_pipeline.testing import FakeOpenAI

    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "askbucket.py").write_text(ASK_PLUGIN)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(tmp_path / "probe")}
    env.pop("RAY_ADDRESS", None)
    with FakeOpenAI(model="fake-model") as srv:
        for out in ("llm/a", "llm/b"):  # two output folders, one cache: the second run asks nothing
            config = write_config(tmp_path, s3(out), pipeline=["askbucket:AskStage"],
                                  stages={"askbucket:AskStage": {"resources": {"num_cpus": 0.5, "pool_size": 2}}},
                                  llm={"roles": {"teacher": {"endpoints": [{"base_url": srv.base_url,
                                                                            "model": "fake-model"}]}},
                                       "cache": {"backend": "files", "path": s3("llm/cache")}})
            run = subprocess.run([str(VENV_BIN / "gmner-pipeline"), "run", "synthesize", "--config", str(config)],
                                 env=env, capture_output=True, text=True, timeout=300)
            assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
            assert srv.calls == len(sample_ids())
    answers = [k for k in bucket.keys("llm/cache/") if k.endswith(".json")]
    assert len(answers) == len(set(sample_ids()))  # one object per distinct request (each tweet's text)
    for out in ("llm/a", "llm/b"):
        assert final_ids(s3(out)) == Counter(sample_ids())
