"""Helpers for tests that drive Ray through its command line, as on a cluster: free ports, the environment, a real
head node started with `ray start --head --block`, and cleanup that ends only this test's own processes.

`ray stop` is never used: it ends every Ray process on the machine, other users' included. A node started with
``--block`` in its own process group is stopped by a signal to that process; anything left is found by the test's own
``--temp-dir`` in its command line and ended by pid.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLE_TXT = REPO_ROOT / "pipeline" / "sample" / "txt"
VENV_BIN = Path(sys.executable).parent  # `ray` and `gmner-pipeline` live beside the interpreter running the tests


def free_ports(n: int) -> list[int]:
    """n distinct ports that are free now (held open together so that no two are the same)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def short_temp_dir(prefix: str) -> str:
    """Ray's unix sockets live below its temp dir and must stay under the 107-byte path limit: keep it short."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def cluster_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1",
               PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}")
    return env


def processes_naming(text: str) -> list:
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if text in " ".join(proc.info["cmdline"] or []):
                found.append(proc)
    return found


def end_processes_naming(text: str, grace_s: float = 15.0) -> list[str]:
    """Wait up to ``grace_s`` for processes whose command line names ``text`` to exit; kill the rest. Returns the
    command lines of those that had to be killed."""
    deadline = time.monotonic() + grace_s
    while (left := processes_naming(text)) and time.monotonic() < deadline:
        time.sleep(0.5)
    killed = []
    for proc in left:
        with contextlib.suppress(Exception):
            killed.append(" ".join(proc.cmdline())[:160])
            proc.kill()
    return killed


def wait_for_job_server(url: str, head: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"`ray start --head` exited with {head.returncode} before the job server came up")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{url}/api/version", timeout=2) as resp:
                if resp.status == 200:
                    return
        time.sleep(0.5)
    raise TimeoutError(f"the Ray job server at {url} did not answer within {timeout_s:.0f} s")


def stop_blocking_node(node: subprocess.Popen, temp_dir: str) -> None:
    """SIGTERM to `ray start --block` drains and shuts its node down; then end whatever of ours is left."""
    if node.poll() is None:
        node.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(node.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        node.wait(timeout=10)
    end_processes_naming(temp_dir, grace_s=5.0)


@contextlib.contextmanager
def ray_head(num_cpus: int = 1, object_store_bytes: int = 100 * 1024 * 1024) -> Iterator[str]:
    """A real Ray head node on free ports; yields the job server's http address."""
    temp_dir = short_temp_dir("rjs-")
    gcs, dashboard, client, agent_http, agent_grpc, runtime_env_agent, metrics, node_manager, object_manager = \
        free_ports(9)
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
           "--node-ip-address", "127.0.0.1", "--port", str(gcs), "--num-cpus", str(num_cpus),
           "--object-store-memory", str(object_store_bytes), "--temp-dir", temp_dir,
           "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
           "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent_http),
           "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(runtime_env_agent),
           "--metrics-export-port", str(metrics), "--node-manager-port", str(node_manager),
           "--object-manager-port", str(object_manager)]
    log_path = Path(temp_dir) / "head.log"
    with open(log_path, "wb") as log:
        head = subprocess.Popen(cmd, env=cluster_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        url = f"http://127.0.0.1:{dashboard}"
        try:
            try:
                wait_for_job_server(url, head)
            except (RuntimeError, TimeoutError) as exc:
                log.flush()
                raise AssertionError(f"{exc}\n{log_path.read_text(errors='replace')[-3000:]}") from None
            yield url
        finally:
            stop_blocking_node(head, temp_dir)
    shutil.rmtree(temp_dir, ignore_errors=True)


def sample_ids() -> list[str]:
    """The record ids the bundled sample must produce, read from its source files (not through the pipeline)."""
    ids = []
    for txt in sorted(SAMPLE_TXT.glob("*.txt")):
        ids += [f"gmner-sample/{txt.stem}/{m}" for m in re.findall(r"^IMGID:(\S+)", txt.read_text(), re.M)]
    return ids
