"""Managed replicas for real: `llm.roles.teacher.serve` starts two llama.cpp servers (SmolLM2-135M, the embedded
server's engine and model) as Ray actors in their own placement groups on a two-node `ray.cluster_utils.Cluster`,
and an LLM stage runs through the CLI against them. Mid-run the test kills one replica's server (its actor restarts
it on the same port) and the other replica's actor process (Ray restarts the actor, which starts a new server on a
new port: the stage workers' clients find it through the replica directory). The run must complete with every record
exactly once and no failed request, and no server process may outlive it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import write_gmner_dataset
from gmner_pipeline.latest import load_latest
from gmner_pipeline.shards import iter_committed_records, read_markers

pytestmark = pytest.mark.integration

PLUGIN = '''
import asyncio
import os

from pydantic import Field

from gmner_pipeline.llm.request import LLMRequest
from gmner_pipeline.stage import Stage, StageConfig


class AskConfig(StageConfig):
    gate: str = Field("", description="after its first batch, a worker waits for this file (the test's kills)")


class AskStage(Stage):
    name = "ask"
    reads = frozenset()
    writes = frozenset({"knowledge"})
    Config = AskConfig

    @classmethod
    def llm_roles(cls, config):
        return {"teacher"}

    async def aprocess(self, records):
        if getattr(self, "_batches", 0) and self.config.gate:
            for _ in range(1200):
                if os.path.exists(self.config.gate):
                    break
                await asyncio.sleep(0.1)
        self._batches = getattr(self, "_batches", 0) + 1
        client = self.llm.client("teacher")
        results = await client.acomplete_many(
            [LLMRequest(messages=[{"role": "user", "content": r["text"]}]) for r in records])
        for record, res in zip(records, results):
            if not res.ok:
                raise RuntimeError(f"request failed: {res.error}")
            record["knowledge"] = [{"entity": "x", "type": "PER", "fine_type": None, "knowledge": res.text,
                                    "answers": [], "voted": None, "cache_key": res.cache_key}]
            self.usage(record, results=[res])
        return records
'''


def _gguf() -> str:
    pytest.importorskip("llama_cpp")
    from gmner_pipeline.llm.config import EmbeddedConfig
    from gmner_pipeline.llm.embedded import EmbeddedServerError, locate_model

    try:
        return str(locate_model(EmbeddedConfig()))
    except EmbeddedServerError as exc:
        pytest.skip(f"no SmolLM2 GGUF: {exc}")


def _servers(alias: str) -> dict[int, int]:
    """pid -> parent pid of every llama.cpp server serving ``alias`` (this test's own, by its unique name)."""
    import psutil

    out = {}
    for proc in psutil.process_iter(["pid", "ppid", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "llama_cpp.server" in cmd and alias in cmd:
            out[proc.info["pid"]] = proc.info["ppid"]
    return out


def _wait(what: str, check, timeout_s: float, proc: subprocess.Popen):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (code {proc.returncode}) while waiting for {what}:\n"
                                 f"{proc.stderr.read()[-4000:] if proc.stderr else ''}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_managed_replicas_survive_a_killed_server_and_a_killed_actor(tmp_path, monkeypatch):
    from ray.cluster_utils import Cluster

    model = _gguf()
    alias = f"smol-{uuid.uuid4().hex[:8]}"
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "askreplicas.py").write_text(PLUGIN)
    # the nodes' raylets start the stage workers: they must find the plugin module
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path / "probe"),
                                                                    os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 2, "resources": {"llm_host": 1},
                                      "object_store_memory": 128 * 1024 * 1024, "include_dashboard": False})
    cluster.add_node(num_cpus=2, resources={"llm_host": 1}, object_store_memory=128 * 1024 * 1024)
    proc = None
    try:
        cluster.wait_for_nodes()
        data = write_gmner_dataset(tmp_path / "data", 24)
        gate = tmp_path / "go"
        cfg = {"run": {"output_dir": str(tmp_path / "out"), "shard_size": 2, "progress": False},
               "source": {"kind": "twitter_gmner", "path": str(data)},
               "pipeline": ["askreplicas:AskStage"],
               "stages": {"askreplicas:AskStage": {"batch_size": 2, "gate": str(gate),
                                                   "resources": {"num_cpus": 0.5, "pool_size": 2,
                                                                 "max_in_flight": 1}}},
               "llm": {"roles": {"teacher": {
                   "serve": {"engine": "llama_cpp", "model": model, "served_model_name": alias, "replicas": 2,
                             "num_cpus": 0.5, "resources": {"llm_host": 1}, "max_restarts": 2,
                             "extra_args": ["--n_threads", "1", "--n_ctx", "512"], "health_interval_s": 0.5,
                             "startup_timeout_s": 120, "placement_timeout_s": 60},
                   "sampling": {"max_tokens": 4},
                   "retry": {"initial_backoff_s": 0.1, "max_backoff_s": 1.0, "max_total_s": 120},
                   "circuit": {"failure_threshold": 1, "cooldown_s": 0.5, "max_cooldown_s": 2.0}}},
                   "cache": {"enabled": False}}}
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        proc = subprocess.Popen([sys.executable, "-m", "gmner_pipeline.cli", "run", "--config",
                                 str(tmp_path / "c.yaml"), "--address", cluster.address],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        first = _wait("two replicas and a committed shard",
                      lambda: len(_servers(alias)) == 2 and list((tmp_path / "out").glob("ask*/*/shard-*.done.json"))
                      and _servers(alias), 180, proc)
        (server_a, _), (server_b, actor_b) = sorted(first.items())
        os.kill(server_a, signal.SIGKILL)  # the server dies: its actor starts it again
        _wait("the killed server to be restarted", lambda: len(set(_servers(alias)) - {server_a, server_b}) == 1,
              60, proc)
        os.kill(actor_b, signal.SIGKILL)  # the actor dies (its server with it): Ray restarts the actor
        _wait("the killed actor's replica to come back",
              lambda: server_b not in _servers(alias) and len(_servers(alias)) == 2, 120, proc)
        gate.write_text("go")
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-4000:]

        final = Path(load_latest(tmp_path / "out")["final_dir"])  # folders in latest.json are relative to the output
        records = list(iter_committed_records(final))
        assert sorted(r["id"] for r in records) == sorted({r["id"] for r in records}) and len(records) == 24
        assert all(r["status"] == "ok" and r["knowledge"][0]["knowledge"] is not None for r in records)
        assert {m for r in records for m in r["lineage"][-1]["model_ids"]} == {alias}
        used: set[str] = set()
        for marker in read_markers(final).values():
            used |= set(marker["llm"]["teacher"]["by_endpoint"])
            assert marker["llm"]["teacher"]["errors"] == {}  # retries and failover hid both kills
        assert len(used) == 3, used  # both first replicas, and the restarted actor's server at its new address
        assert "restarted (1 of 2)" in stderr + stdout and "started again after its actor was restarted" in \
            stderr + stdout
        assert _servers(alias) == {}  # every server stopped with the run

        # a replica no node can hold: the run stops before any work and says what is missing
        cfg["llm"]["roles"]["teacher"]["serve"].update(num_gpus=8, placement_timeout_s=2)
        cfg["run"]["output_dir"] = str(tmp_path / "out-gpu")
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
        refused = subprocess.run([sys.executable, "-m", "gmner_pipeline.cli", "run", "--config",
                                  str(tmp_path / "c.yaml"), "--address", cluster.address],
                                 env=env, capture_output=True, text=True, timeout=300)
        assert refused.returncode == 2, refused.stderr[-3000:]
        assert "no node of the cluster has {CPU: 0.5, GPU: 8, llm_host: 1}" in refused.stderr
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.communicate()
        cluster.shutdown()
        for pid in _servers(alias):
            os.kill(pid, signal.SIGKILL)
