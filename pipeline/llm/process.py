"""Run a local OpenAI-compatible server as a child process: pick a free port, wait until it answers, stop it for sure.

Shared by the embedded default server (``embedded.py``) and the vLLM test server (``tests/support/tiny_vllm.py``). The child
runs in its own process group so that stopping it also stops anything it spawned (vLLM starts an engine process), and
an ``atexit`` hook stops it if the parent exits without calling ``stop()`` (Ctrl-C, an exception in the run).
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from threading import Thread
from typing import Callable, Sequence

log = logging.getLogger(__name__)


class ServerStartError(RuntimeError):
    """The local server did not become ready; the message carries the tail of its log."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host`` (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def is_ready(base_url: str, timeout: float = 2.0) -> bool:
    """True when ``GET {base_url}/models`` answers 200 (the OpenAI-compatible readiness check)."""
    try:
        with urllib.request.urlopen(base_url.rstrip("/") + "/models", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


class ServerProcess:
    """A child server process with its log kept in memory (last lines) and optionally in a file."""

    def __init__(self, argv: Sequence[str], *, base_url: str, env: dict[str, str] | None = None,
                 log_path: str | Path | None = None, name: str = "server",
                 preexec_fn: Callable[[], None] | None = None):
        self.argv = list(argv)
        self.base_url = base_url
        self.env = env
        self.log_path = Path(log_path) if log_path else None
        self.name = name
        self.preexec_fn = preexec_fn
        self.proc: subprocess.Popen[bytes] | None = None
        self._tail: deque[str] = deque(maxlen=60)
        self._reader: Thread | None = None
        self.started_s: float | None = None

    def start(self, ready_timeout: float = 120.0) -> "ServerProcess":
        t0 = time.perf_counter()
        log.info("starting %s: %s", self.name, " ".join(self.argv))
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=self.env, start_new_session=True, preexec_fn=self.preexec_fn,
        )
        atexit.register(self.stop)
        self._reader = Thread(target=self._pump, name=f"{self.name}-log", daemon=True)
        self._reader.start()
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._reader.join(timeout=2)
                raise ServerStartError(f"{self.name} exited with code {self.proc.returncode} before it was ready; "
                                       f"its last output:\n{self.log_tail()}")
            if is_ready(self.base_url, timeout=1.0):
                self.started_s = time.perf_counter() - t0
                log.info("%s ready at %s after %.1f s", self.name, self.base_url, self.started_s)
                return self
            time.sleep(0.2)
        self.stop()
        raise ServerStartError(f"{self.name} was not ready at {self.base_url} within {ready_timeout:.0f} s; "
                               f"its last output:\n{self.log_tail()}")

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        sink = self.log_path.open("ab") if self.log_path else None
        try:
            for raw in self.proc.stdout:
                if sink:
                    sink.write(raw)
                    sink.flush()
                self._tail.append(raw.decode("utf-8", "replace").rstrip())
        finally:
            if sink:
                sink.close()

    def log_tail(self) -> str:
        return "\n".join(self._tail)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL what is left after ``grace`` seconds. Safe to call twice."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            log.info("stopping %s (pid %s)", self.name, proc.pid)
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        else:
            # the leader is gone; children it left in its group (an engine process) must go too
            _signal_group(proc.pid, signal.SIGKILL)
        atexit.unregister(self.stop)
        self.proc = None

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
