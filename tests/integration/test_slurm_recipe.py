"""The Slurm recipe (deploy/slurm/gmner-ray.sbatch) run for real, with `srun` and `scontrol` stood in for.

There is no Slurm here, so two small shims take their place: `scontrol show hostnames` names two nodes, and `srun`
drops its options and runs the command on this machine (one task per step, `hostname --ip-address` answers the
loopback address). Everything else is the recipe as a user runs it: a Ray head and a worker started with
`ray start --block`, the wait until both joined, `gmner-pipeline run synthesize` against them, and Ray stopped at the
end by the recipe's own trap.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import yaml

from gmner_pipeline.shards import SHARD_GLOB, read_markers, read_records
from gmner_pipeline.latest import load_latest
from ray_cli import cluster_env, end_processes_naming, free_ports, sample_ids, short_temp_dir

pytestmark = pytest.mark.integration

RECIPE = Path(__file__).resolve().parents[2] / "deploy" / "slurm" / "gmner-ray.sbatch"

SCONTROL = """#!/bin/bash
# scontrol show hostnames LIST -> the fake allocation's nodes
[ "$1 $2" = "show hostnames" ] || { echo "fake scontrol: only 'show hostnames'" >&2; exit 2; }
printf 'fake-node-1\\nfake-node-2\\n'
"""

SRUN = """#!/bin/bash
# srun [options] command...: drop the options (and -w's value), run the command here, once
while [ $# -gt 0 ]; do
    case "$1" in
        -w) shift 2 ;;
        -*) shift ;;
        *) break ;;
    esac
done
if [ "$1" = hostname ]; then echo 127.0.0.1; exit 0; fi
exec "$@"
"""


def test_slurm_recipe_starts_ray_runs_the_sample_and_stops(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", SCONTROL), ("srun", SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    out = tmp_path / "out"
    config = tmp_path / "my.yaml"
    config.write_text(yaml.safe_dump({
        "run": {"shard_size": 2, "progress": False},
        "source": {"kind": "sample"},
        "pipeline": ["passthrough"],
        # one CPU per node and a pool of two: the shards go to both nodes
        "stages": {"passthrough": {"sleep_per_record": 0.2,
                                   "resources": {"num_cpus": 1, "pool_size": 2, "max_in_flight": 1}}},
    }))
    temp_dir = short_temp_dir("slr-")
    ports = free_ports(16)
    mb100 = str(100 * 1024 * 1024)
    common = ["--temp-dir", temp_dir, "--object-store-memory", mb100, "--disable-usage-stats"]
    # Two "nodes" on one machine need their own agent and metrics ports; on a real allocation the defaults do.
    head_args = [*common, "--node-ip-address", "127.0.0.1", "--ray-client-server-port", str(ports[2]),
                 "--dashboard-agent-listen-port", str(ports[3]), "--dashboard-agent-grpc-port", str(ports[4]),
                 "--runtime-env-agent-port", str(ports[5]), "--metrics-export-port", str(ports[6])]
    worker_args = [*common, "--node-ip-address", "127.0.0.1", "--dashboard-agent-listen-port", str(ports[7]),
                   "--dashboard-agent-grpc-port", str(ports[8]), "--runtime-env-agent-port", str(ports[9]),
                   "--metrics-export-port", str(ports[10])]
    env = cluster_env()
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
        SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="fake-node-[1-2]", SLURM_CPUS_PER_TASK="1",
        CONFIG=str(config), OUTPUT_DIR=str(out), RAY_PORT=str(ports[0]), DASHBOARD_PORT=str(ports[1]),
        RAY_HEAD_ARGS=" ".join(head_args), RAY_WORKER_ARGS=" ".join(worker_args), RAY_WAIT_S="120",
    )
    proc = subprocess.Popen(["bash", str(RECIPE)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=400)
    finally:
        # The recipe stops Ray itself; this only guards against a failed run leaving our processes behind.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        leftover = end_processes_naming(temp_dir)
    shutil.rmtree(temp_dir, ignore_errors=True)
    assert proc.returncode == 0, log[-5000:]
    assert "2/2 Ray nodes up" in log, log[-3000:]
    assert "Ray stopped" in log
    assert leftover == [], f"the recipe left Ray processes running: {leftover}"

    summary = load_latest(out)
    final = Path(summary["final_dir"])
    markers = read_markers(final)
    assert sorted(markers) == list(range(summary["ingest"]["num_shards"]))
    assert len({m["node_id"] for m in markers.values()}) == 2  # both "nodes" did work
    records = [r for shard in sorted(final.glob(SHARD_GLOB)) for r in read_records(shard)]
    assert Counter(r["id"] for r in records) == Counter(sample_ids())

