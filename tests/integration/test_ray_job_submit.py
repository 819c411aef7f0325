"""`ray job submit` for real: a Ray head started with `ray start --head` (as on a cluster's head node), the bundled
sample submitted as a Ray job with its config in the job's working directory, and the output read back shard by shard.

The head runs with ``--block`` in its own process group, so stopping it touches only the processes this test started
(``ray stop`` would end every Ray process on the machine, other users' included): see ray_cli.py.
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import yaml

from gmner_pipeline.shards import SHARD_GLOB, read_markers, read_records
from gmner_pipeline.latest import load_latest
from ray_cli import VENV_BIN, cluster_env, ray_head, sample_ids

pytestmark = pytest.mark.integration


def submit(url: str, working_dir: Path, *entrypoint: str, timeout_s: int = 300) -> subprocess.CompletedProcess:
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", url, "--working-dir", str(working_dir),
           "--", *entrypoint]
    return subprocess.run(cmd, env=cluster_env(), capture_output=True, text=True, timeout=timeout_s)


def test_ray_job_submit_runs_the_sample_exactly_once(tmp_path):
    expected = sample_ids()
    assert len(expected) >= 10
    out = tmp_path / "out"  # absolute: the job's working directory is a temporary copy on the head node
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    # What a user ships with --working-dir: their config; the package itself is installed on every node.
    (job_dir / "my.yaml").write_text(yaml.safe_dump({
        "run": {"output_dir": str(out), "shard_size": 3, "progress": False},
        "source": {"kind": "sample"},
        "pipeline": ["template_cot"],
        "stages": {"template_cot": {"resources": {"num_cpus": 0.5, "pool_size": 2}}},
    }))

    with ray_head() as url:
        first = submit(url, job_dir, "gmner-pipeline", "run", "synthesize", "--config", "my.yaml")
        assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
        assert "succeeded" in first.stdout.lower(), first.stdout[-2000:]
        again = submit(url, job_dir, "gmner-pipeline", "run", "synthesize", "--config", "my.yaml")
        assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]

    summary = load_latest(out)
    assert summary["ok"] is True
    final = Path(summary["final_dir"])
    assert final.parent.name == "template_cot" and final.is_relative_to(out)

    # complete: one committed shard per ingest shard, each with its marker
    num_shards = summary["ingest"]["num_shards"]
    assert num_shards == -(-len(expected) // 3)
    assert sorted(read_markers(final)) == list(range(num_shards))
    assert len(list(final.glob(SHARD_GLOB))) == num_shards

    # exactly once: every sample record in the output once, nothing else, each with its reasoning chain
    records = [r for shard in sorted(final.glob(SHARD_GLOB)) for r in read_records(shard)]
    assert Counter(r["id"] for r in records) == Counter(expected)
    assert all(r["status"] == "ok" for r in records), [(r["id"], r["error"]) for r in records if r["status"] != "ok"]

    # the second submission found everything committed and recomputed nothing
    assert summary["stages"]["template_cot"]["shards_processed_now"] == 0
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert len(runs) == 2
    first_run = json.loads((out / "runs" / runs[0] / "summary.json").read_text())
    assert first_run["stages"]["template_cot"]["shards_processed_now"] == num_shards
