"""Faults with real processes, for chaos tests and soak runs: replicas of a real OpenAI-compatible server that can be
killed, stopped and restarted, and the Ray workers of this process's own runs.

``Replicas(n)`` starts ``n`` llama.cpp servers with SmolLM2 (the embedded default's server, ``llm.embedded``), each on
a port it keeps, so a replica restarted after a ``kill -9`` comes back at the same URL and the client's circuit
breaker brings it back into rotation. ``own_ray_workers()`` lists the stage actors started by Ray instances of this
process only: on a shared machine, other people's workers are never touched.
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

import psutil

from ..llm.config import EmbeddedConfig, EndpointConfig
from ..llm.embedded import EmbeddedServer


class Replicas:
    """``n`` llama.cpp replicas of one model; ``endpoints()`` for a role's config."""

    def __init__(self, n: int = 2, config: EmbeddedConfig | None = None):
        self.config = config or EmbeddedConfig(n_threads=1, n_ctx=512, max_concurrency=2)
        self.servers = [EmbeddedServer(self.config) for _ in range(n)]
        self.events: list[tuple[str, int]] = []  # (what, replica), in order

    def start(self) -> "Replicas":
        for server in self.servers:
            server.start()
        return self

    def stop(self) -> None:
        for server in self.servers:
            with contextlib.suppress(Exception):
                self.resume(self.servers.index(server))
            server.stop()

    def __enter__(self) -> "Replicas":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def endpoints(self, **kw: Any) -> list[dict[str, Any]]:
        return [EndpointConfig(base_url=s.endpoint().base_url, model=self.config.model_name,
                               json_schema_via="json_object", **kw).model_dump(mode="json") for s in self.servers]

    def pid(self, i: int) -> int:
        process = self.servers[i].process
        if process is None or process.pid is None:
            raise RuntimeError(f"replica {i} is not running")
        return process.pid

    def kill(self, i: int) -> None:
        """kill -9 the replica (its whole process group), like a crashed or OOM-killed server."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid(i), signal.SIGKILL)
        self.servers[i].process.proc.wait(timeout=10)  # type: ignore[union-attr]
        self.events.append(("kill", i))

    def pause(self, i: int) -> None:
        """SIGSTOP the replica: it accepts connections and answers nothing (a hung server, a GC pause)."""
        os.killpg(self.pid(i), signal.SIGSTOP)
        self.events.append(("stop", i))

    def resume(self, i: int) -> None:
        with contextlib.suppress(ProcessLookupError, RuntimeError):
            os.killpg(self.pid(i), signal.SIGCONT)
            self.events.append(("resume", i))

    def restart(self, i: int) -> None:
        """Start a killed replica again on its own port."""
        server = self.servers[i]
        if server.process is not None:
            server.process.stop(grace=1)
            server.process = None
        server.start()
        self.events.append(("restart", i))


def own_ray_workers(name: str = "ray::ShardActor") -> list[psutil.Process]:
    """The stage actor processes below this process (the Ray instance it started), never anyone else's."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if name in " ".join(proc.cmdline()):
                found.append(proc)
    return found
