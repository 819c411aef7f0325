"""Managed model replicas: the OpenAI-compatible servers a role asks the pipeline to start on the Ray cluster.

```yaml
llm:
  roles:
    teacher:
      serve: {engine: vllm, model: Qwen/Qwen2.5-VL-72B-Instruct, tensor_parallel_size: 4, replicas: 2}
```

For each replica the driver (``ManagedReplicas``) reserves a placement group of one bundle, ``{GPU: tp, CPU: n,
...custom}`` (one bundle, so the tensor-parallel GPUs are on one node), and schedules a ``ReplicaActor`` into it. The
actor picks a free port on its node, starts the server as its child process (``process.ServerProcess``: own process
group, SIGTERM when the actor dies), waits until ``/v1/models`` answers and reports ``http://<node ip>:<port>/v1``.
It keeps watching: a server that exits, or stops answering for ``unhealthy_after_s``, is started again (on the same
port when it is free), up to ``max_restarts`` times; an actor that dies (its node, a kill) is restarted by Ray and
starts a new server. Every replica publishes its current URL to one ``ReplicaDirectory`` actor; the LLM client of
every stage worker looks it up when an endpoint stops answering (``RoleConfig.directory``, ``lookup``), so a replica
that comes back on another node or port is found without restarting anything. At the end, or on Ctrl-C, every
server gets SIGTERM (then SIGKILL), the actors are killed and the placement groups removed.

This module may import Ray; stage modules never import it (they reach the replicas through the LLM client).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from .config import EndpointConfig, LLMConfigError, ServeConfig
from .process import ServerProcess, ServerStartError, is_ready

log = logging.getLogger(__name__)

__all__ = ["ManagedReplicas", "ReplicaActor", "ReplicaDirectory", "ReplicaError", "bundle_of", "lookup",
           "placement_problem", "server_argv"]

# how many calls a replica actor serves at once: wait_ready blocks, and status/stop must still get through
_ACTOR_THREADS = 4


class ReplicaError(LLMConfigError):
    """Managed replicas could not be started; the message says what is missing or what the server said."""


# --- pure parts: the command line, the bundle, why a bundle cannot be placed -------------------------------------


def _has_flag(args: list[str], *flags: str) -> bool:
    return any(a == f or a.startswith(f + "=") for a in args for f in flags)


def server_argv(serve: ServeConfig, port: int, host: str = "0.0.0.0", python: str | None = None) -> list[str]:
    """The command line that starts one replica's server on ``host:port``."""
    py = serve.python or python or sys.executable
    extra = list(serve.extra_args)
    if serve.engine == "llama_cpp":
        argv = [py, "-m", "llama_cpp.server", "--model", serve.model, "--model_alias", serve.name(),
                "--host", host, "--port", str(port)]
        if not _has_flag(extra, "--n_threads"):  # llama.cpp's default is half the machine's cores, not the bundle's
            argv += ["--n_threads", str(max(1, int(serve.num_cpus)))]
        if serve.gpus() > 0 and not _has_flag(extra, "--n_gpu_layers"):
            argv += ["--n_gpu_layers", "-1"]
        return argv + extra
    argv = [py, "-m", "vllm.entrypoints.openai.api_server", "--model", serve.model,
            "--served-model-name", serve.name(), "--host", host, "--port", str(port),
            "--tensor-parallel-size", str(serve.tensor_parallel_size)]
    if serve.tensor_parallel_size > 1 and not _has_flag(extra, "--distributed-executor-backend"):
        # the server runs inside a Ray worker: without this, vLLM may try to join the pipeline's Ray cluster for its
        # tensor-parallel workers; the GPUs Ray gave the actor are all on this node (one bundle)
        argv += ["--distributed-executor-backend", "mp"]
    return argv + extra


def json_schema_via(serve: ServeConfig) -> str:
    return "json_object" if serve.engine == "llama_cpp" else "json_schema"


def bundle_of(serve: ServeConfig) -> dict[str, float]:
    """The resources of one replica, as one placement-group bundle (so that they are on one node)."""
    bundle = {"CPU": float(serve.num_cpus), "GPU": serve.gpus(), **{k: float(v) for k, v in serve.resources.items()}}
    bundle = {k: v for k, v in bundle.items() if v > 0}
    return bundle or {"CPU": 0.001}  # Ray refuses an empty bundle


def _fits(bundle: dict[str, float], offer: dict[str, float]) -> bool:
    return all(offer.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items())


def placement_problem(bundle: dict[str, float], nodes: list[dict[str, Any]],
                      available: dict[str, float] | None = None) -> str:
    """Why a bundle was not placed, in words, from ``ray.nodes()`` (and ``ray.available_resources()``)."""
    alive = [n for n in nodes if n.get("Alive", n.get("alive", True))]
    wanted = ", ".join(f"{k}: {v:g}" for k, v in sorted(bundle.items()))
    if not any(_fits(bundle, n.get("Resources", {})) for n in alive):
        shown = sorted({", ".join(f"{k}: {v:g}" for k, v in sorted(n.get("Resources", {}).items())
                                  if k in bundle) or "none of them" for n in alive})
        return (f"no node of the cluster has {{{wanted}}} (a replica's GPUs must be on one node); the nodes offer "
                f"{shown or ['nothing: no node is alive']}. Add a node that has them, or lower "
                f"tensor_parallel_size / num_gpus / num_cpus / resources under serve")
    free = ", ".join(f"{k}: {v:g}" for k, v in sorted((available or {}).items()) if k in bundle)
    return (f"nodes with {{{wanted}}} exist but their resources are taken (by other replicas, stage actors or other "
            f"jobs; free now across the cluster: {free or 'none'}). Free them, lower serve.replicas, or raise "
            f"serve.placement_timeout_s if an autoscaler is adding nodes")


def port_is_free(port: int, host: str = "0.0.0.0") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def pick_port(wanted: int | None, host: str = "0.0.0.0") -> int:
    """``wanted`` when it is free, else one the OS picks."""
    if wanted and port_is_free(wanted, host):
        return wanted
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# --- the actors -------------------------------------------------------------------------------------------------


class ReplicaDirectory:
    """A Ray actor: the current base URL of every replica (None while one is down) and what happened to them."""

    def __init__(self) -> None:
        self.urls: dict[str, dict[int, str | None]] = {}
        self.history: list[dict[str, Any]] = []

    def publish(self, role: str, index: int, url: str | None, event: str) -> None:
        self.urls.setdefault(role, {})[index] = url
        self.history.append({"role": role, "replica": index, "url": url, "event": event, "time": time.time()})

    def lookup(self, role: str) -> list[str | None]:
        by_index = self.urls.get(role, {})
        return [by_index.get(i) for i in range(max(by_index, default=-1) + 1)]

    def events(self) -> list[dict[str, Any]]:
        return list(self.history)


@dataclass
class _State:
    url: str | None = None
    error: str | None = None
    restarts: int = 0
    stopping: bool = False
    ready: threading.Event = field(default_factory=threading.Event)


class ReplicaActor:
    """A Ray actor body: one server process on this node, started, watched and restarted by ONE supervisor thread.

    One thread, because Linux sends a child its parent-death signal (PR_SET_PDEATHSIG) when the *thread* that forked
    it exits: a server started from a short-lived thread would be killed when that thread ends."""

    def __init__(self, role: str, index: int, serve: dict[str, Any], directory: str):
        import warnings

        import ray

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        self.role, self.index = role, index
        self.serve = ServeConfig.model_validate(serve)
        # by name, not a handle: a handle argument lives in the object store, and Ray's restart of this actor would
        # fail once it is gone
        self.directory = ray.get_actor(directory)
        self.node_ip = ray.util.get_node_ip_address()
        context = ray.get_runtime_context()
        self.node_id = context.get_node_id()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # Ray warns about its own use of actor_id here
            self.reconstructed = context.was_current_actor_reconstructed
        self.server: ServerProcess | None = None
        self.port = self.serve.port
        self.state = _State()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._supervise, name=f"replica-{role}-{index}", daemon=True)
        self._thread.start()

    # called by the driver ------------------------------------------------------------------------------------

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        """Block until the server answers (its URL and where it runs) or fails to start (raises ReplicaError)."""
        if not self.state.ready.wait(timeout):
            raise ReplicaError(f"replica {self.role}/{self.index} on {self.node_ip} did not answer within "
                               f"{timeout:.0f} s (serve.startup_timeout_s); its last output:\n{self._tail()}")
        if self.state.url is None:
            raise ReplicaError(f"replica {self.role}/{self.index} on {self.node_ip} failed: {self.state.error}")
        return self.status()

    def status(self) -> dict[str, Any]:
        server = self.server
        return {"role": self.role, "replica": self.index, "url": self.state.url, "node_ip": self.node_ip,
                "node_id": self.node_id, "pid": os.getpid(), "server_pid": server.pid if server else None,
                "restarts": self.state.restarts, "reconstructed": self.reconstructed, "error": self.state.error}

    def stop(self, grace_s: float = 30.0) -> None:
        """Stop the server (SIGTERM to its process group, SIGKILL after ``grace_s``) and the supervisor."""
        self.state.stopping = True
        with self._lock:
            server = self.server
        if server is not None:
            server.stop(grace=grace_s)
        self._thread.join(timeout=grace_s + 10)

    # the supervisor thread --------------------------------------------------------------------------------------

    def _tail(self) -> str:
        return self.server.log_tail() if self.server is not None else "(no output)"

    def _publish(self, url: str | None, event: str) -> None:
        log.info("replica %s/%s: %s", self.role, self.index, event)
        try:
            self.directory.publish.remote(self.role, self.index, url, event)
        except Exception:  # noqa: BLE001 - the directory is gone only when the run is ending
            log.debug("replica %s/%s: directory unreachable", self.role, self.index)

    def _start_server(self) -> bool:
        from .embedded import _die_with_parent

        self.port = pick_port(self.port)  # the same port as before when it is free: clients find it unchanged
        url = f"http://{self.node_ip}:{self.port}/v1"
        env = {**os.environ, **self.serve.env}
        server = ServerProcess(server_argv(self.serve, self.port), base_url=url, env=env,
                               name=f"{self.serve.engine} replica {self.role}/{self.index}",
                               preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        with self._lock:
            if self.state.stopping:
                return False
            self.server = server
        try:
            server.start(ready_timeout=self.serve.startup_timeout_s)
        except (ServerStartError, AttributeError, OSError) as exc:  # AttributeError: stopped while starting
            if self.state.stopping:
                return False
            self.state.error = str(exc)
            return False
        self.state.url, self.state.error = url, None
        return True

    def _watch(self) -> str:
        """Return why the running server has to be replaced (or '' when the actor is stopping)."""
        server = self.server
        last_ok = time.monotonic()
        while not self.state.stopping:
            time.sleep(self.serve.health_interval_s)
            if self.state.stopping or server is None:
                return ""
            if not server.alive():
                code = server.proc.returncode if server.proc is not None else None
                return f"server exited (code {code})"
            if is_ready(server.base_url, timeout=min(10.0, self.serve.unhealthy_after_s)):
                last_ok = time.monotonic()
            elif time.monotonic() - last_ok > self.serve.unhealthy_after_s:
                return f"server alive but not answering for {self.serve.unhealthy_after_s:.0f} s"
        return ""

    def _supervise(self) -> None:
        first = "started again after its actor was restarted" if self.reconstructed else "started"
        while not self.state.stopping:
            if self._start_server():
                self._publish(self.state.url, f"{first} at {self.state.url}")
                self.state.ready.set()
                why = self._watch()
                if not why:
                    break
                self.state.url = None
                self._publish(None, why)
                with self._lock:
                    if self.server is not None:
                        self.server.stop(grace=5)
            elif self.state.stopping:
                break
            if self.state.restarts >= self.serve.max_restarts:
                self.state.error = (f"gave up after {self.state.restarts} restarts (serve.max_restarts): "
                                    f"{self.state.error or 'the server kept dying'}")
                self._publish(None, self.state.error)
                self.state.ready.set()
                return
            self.state.restarts += 1
            first = f"restarted ({self.state.restarts} of {self.serve.max_restarts})"
        self.state.ready.set()


# --- the driver side --------------------------------------------------------------------------------------------


@dataclass
class _Replica:
    role: str
    index: int
    group: Any
    actor: Any = None
    info: dict[str, Any] = field(default_factory=dict)


class ManagedReplicas:
    """Start, hand out and stop the replicas of the ``serve`` roles of a run (Ray must be initialised)."""

    def __init__(self, serve: dict[str, ServeConfig]):
        self.serve = serve
        self.replicas: list[_Replica] = []
        self.directory: Any = None
        self.directory_name = f"gmner-replicas-{uuid.uuid4().hex[:8]}"

    def start(self) -> dict[str, list[EndpointConfig]]:
        """Place and start every replica, wait until each answers; returns each role's endpoints. On any failure
        everything started so far is stopped and ``ReplicaError`` says what is missing."""
        import ray
        from ray.util.placement_group import placement_group

        if not ray.is_initialized():
            raise ReplicaError("managed LLM replicas need Ray: the runner starts it before the LLM services")
        try:
            self.directory = ray.remote(ReplicaDirectory).options(
                name=self.directory_name, num_cpus=0, max_restarts=-1).remote()
            for role, serve in sorted(self.serve.items()):
                for i in range(serve.replicas):
                    group = placement_group([bundle_of(serve)], strategy="STRICT_PACK")
                    self.replicas.append(_Replica(role, i, group))
            self._wait_placed()
            for r in self.replicas:
                r.actor = self._actor(r)
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self.endpoints()

    def _wait_placed(self) -> None:
        import ray

        deadline = {r.role: time.monotonic() + self.serve[r.role].placement_timeout_s for r in self.replicas}
        for r in self.replicas:
            if not r.group.wait(max(0.0, deadline[r.role] - time.monotonic())):
                raise ReplicaError(f"llm.roles.{r.role}.serve: replica {r.index} could not be placed within "
                                   f"{self.serve[r.role].placement_timeout_s:.0f} s: "
                                   + placement_problem(bundle_of(self.serve[r.role]), ray.nodes(),
                                                       ray.available_resources()))

    def _actor(self, r: _Replica) -> Any:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        serve = self.serve[r.role]
        bundle = bundle_of(serve)
        return ray.remote(ReplicaActor).options(
            num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0),
            resources={k: v for k, v in bundle.items() if k not in ("CPU", "GPU")},
            scheduling_strategy=PlacementGroupSchedulingStrategy(r.group, placement_group_bundle_index=0),
            max_restarts=serve.max_restarts, max_concurrency=_ACTOR_THREADS,
        ).remote(r.role, r.index, serve.model_dump(mode="json"), self.directory_name)

    def _wait_ready(self) -> None:
        import ray

        waits = {r.actor.wait_ready.remote(self.serve[r.role].startup_timeout_s): r for r in self.replicas}
        timeout = max(s.startup_timeout_s for s in self.serve.values()) + 60
        deadline = time.monotonic() + timeout
        pending = list(waits)
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                r = waits[pending[0]]
                raise ReplicaError(f"llm.roles.{r.role}.serve: replica {r.index} did not become ready within "
                                   f"{timeout:.0f} s")
            r = waits[done[0]]
            try:
                r.info = ray.get(done[0])
            except ray.exceptions.RayTaskError as exc:
                raise ReplicaError(f"llm.roles.{r.role}.serve: {exc.cause if exc.cause else exc}") from None
            log.info("llm role %s: replica %d ready at %s", r.role, r.index, r.info["url"])

    def endpoints(self) -> dict[str, list[EndpointConfig]]:
        out: dict[str, list[EndpointConfig]] = {}
        for r in self.replicas:
            serve = self.serve[r.role]
            out.setdefault(r.role, []).append(EndpointConfig(
                base_url=r.info["url"], model=serve.name(), max_concurrency=serve.max_concurrency,
                json_schema_via=json_schema_via(serve)))  # type: ignore[arg-type]
        return out

    def directory_address(self, role: str) -> str:
        """What the client's ``RoleConfig.directory`` holds for ``role`` (see ``lookup``)."""
        return f"ray:{self.directory_name}/{role}"

    def status(self) -> list[dict[str, Any]]:
        """Each replica's status (URL, node, restarts), as its actor reports it now."""
        import ray

        out = []
        for r in self.replicas:
            try:
                out.append(ray.get(r.actor.status.remote(), timeout=10))
            except Exception as exc:  # noqa: BLE001 - a dead replica is a status too
                out.append({"role": r.role, "replica": r.index, "error": f"{type(exc).__name__}: {exc}"})
        return out

    def events(self) -> list[dict[str, Any]]:
        import ray

        if self.directory is None:
            return []
        try:
            return ray.get(self.directory.events.remote(), timeout=10)
        except Exception:  # noqa: BLE001
            return []

    def stop(self, grace_s: float = 30.0) -> None:
        """Stop every server (SIGTERM, then SIGKILL after ``grace_s``), kill the actors, remove the placement groups.
        Safe to call twice, and after a partial start."""
        import ray
        from ray.util.placement_group import remove_placement_group

        stopping = [r.actor.stop.remote(grace_s) for r in self.replicas if r.actor is not None]
        if stopping:
            ray.wait(stopping, num_returns=len(stopping), timeout=grace_s + 15)
        for r in self.replicas:
            if r.actor is not None:
                try:
                    ray.kill(r.actor, no_restart=True)
                except Exception:  # noqa: BLE001
                    pass
            try:
                remove_placement_group(r.group)
            except Exception:  # noqa: BLE001
                pass
        if self.directory is not None:
            try:
                ray.kill(self.directory, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        self.replicas, self.directory = [], None


_DIRECTORIES: dict[str, Any] = {}


def lookup(address: str, timeout: float = 5.0) -> list[str | None]:
    """The current base URLs of a role's replicas, for ``address`` = ``<directory actor name>/<role>`` (what the
    client finds after ``ray:`` in ``RoleConfig.directory``). Called from stage workers, which run inside Ray."""
    import ray

    name, _, role = address.partition("/")
    actor = _DIRECTORIES.get(name)
    if actor is None:
        actor = _DIRECTORIES[name] = ray.get_actor(name)
    return ray.get(actor.lookup.remote(role), timeout=timeout)
