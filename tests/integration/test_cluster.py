"""The CLI joining an existing multi-node Ray cluster (ray.cluster_utils.Cluster: two raylets on this machine)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import write_gmner_dataset
from gmner_pipeline.shards import read_markers
from gmner_pipeline.latest import load_latest

pytestmark = pytest.mark.integration


def test_run_with_address_spreads_a_stage_over_two_nodes(tmp_path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 1, "object_store_memory": 128 * 1024 * 1024,
                                      "include_dashboard": False})
    cluster.add_node(num_cpus=1, object_store_memory=128 * 1024 * 1024)
    try:
        cluster.wait_for_nodes()
        data = write_gmner_dataset(tmp_path / "data", 24)
        cfg = {"run": {"output_dir": str(tmp_path / "out"), "shard_size": 2, "progress": False},
               "source": {"kind": "twitter_gmner", "path": str(data)}, "pipeline": ["passthrough"],
               "stages": {"passthrough": {"sleep_per_record": 0.05,
                                          "resources": {"num_cpus": 1, "pool_size": 2, "max_in_flight": 1}}}}
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        proc = subprocess.run([sys.executable, "-m", "gmner_pipeline.cli", "run", "--config", str(tmp_path / "c.yaml"),
                               "--address", cluster.address], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        final = Path(load_latest(tmp_path / "out")["final_dir"])
        markers = read_markers(final)
        assert len(markers) == 12
        assert len({m["node_id"] for m in markers.values()}) == 2  # both nodes did work
    finally:
        cluster.shutdown()
