"""The Ray session of a run: join the configured cluster, or start a local Ray instance that the run owns.

A local run (no ``run.ray_address`` / ``RAY_ADDRESS``) always starts its own instance (``address="local"``): it never
joins a stray cluster some earlier ``ray start`` left on the machine. It starts only what a run needs: GCS, the raylet
(with the two agents the raylet insists on), the log monitor (worker log lines reach the driver) and the stage actors.
Ray's dashboard, its autoscaler monitor and the idle workers Ray prestarts for the first driver are left out unless
``run.ray_dashboard`` is set: on a 2-core machine the default run went from 10 processes and 1.1 GB to 8 and 0.83 GB,
and ``ray.init`` + ``ray.shutdown`` from 5.9 s to 3.3 s (README, benchmarks/runner.py --startup-rounds). Ray offers no public switch for the dashboard and
monitor processes of a local head, so they are skipped by replacing two methods of ``ray._private.node.Node`` for the
duration of ``ray.init`` only; on a Ray without those methods the run starts Ray's full set.

Nothing of a local instance outlives the command: ``ray.shutdown`` at the end, and a ``reaper`` process that kills
what is left of it when the driver dies, even by SIGKILL.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterator

from .config import RunConfig

log = logging.getLogger(__name__)

# idle workers Ray starts for the first driver: a run starts its actors itself, and on a small machine the prestarted
# processes compete with everything else start-up does
LEAN_SYSTEM_CONFIG = {"prestart_worker_first_driver": False, "enable_worker_prestart": False}


@contextlib.contextmanager
def lean_head() -> Iterator[None]:
    """While ``ray.init`` starts a local head: no dashboard process and no autoscaler monitor."""
    try:
        from ray._private.node import Node
    except ImportError:  # pragma: no cover - another Ray layout: start what Ray starts
        yield
        return
    saved = {name: getattr(Node, name, None) for name in ("start_api_server", "start_monitor")}
    if None in saved.values():  # pragma: no cover
        yield
        return
    Node.start_api_server = lambda self, *a, **kw: None  # type: ignore[method-assign]
    Node.start_monitor = lambda self, *a, **kw: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(Node, name, fn)


def cluster_address(config: RunConfig) -> str | None:
    """The cluster a run joins, or None for a local instance of its own."""
    address = config.run.ray_address or os.environ.get("RAY_ADDRESS")
    return None if not address or address == "local" else address


@contextlib.contextmanager
def ray_session(config: RunConfig) -> Iterator[Any]:
    """Join ``run.ray_address`` (or ``RAY_ADDRESS``), or start a local Ray instance owned by this run; reuse one
    already initialised in this process (tests, notebooks)."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    address = cluster_address(config)
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING}
    if address:
        ray.init(address=address, include_dashboard=False, **kwargs)
        try:
            yield ray
        finally:
            ray.shutdown()
        return
    if config.run.num_cpus is not None:
        kwargs["num_cpus"] = config.run.num_cpus
    if config.run.object_store_memory is not None:
        kwargs["object_store_memory"] = config.run.object_store_memory
    from . import reaper

    before = set(reaper.children(os.getpid())) if reaper.supported() else set()
    with local_auth_mode():
        if config.run.ray_dashboard:
            ray.init(address="local", include_dashboard=True, **kwargs)
        else:
            with lean_head():
                ray.init(address="local", include_dashboard=False, _system_config=LEAN_SYSTEM_CONFIG, **kwargs)
    started = sorted(set(reaper.children(os.getpid())) - before) if reaper.supported() else []
    guard = reaper.Reaper(started) if started else None
    try:
        yield ray
    finally:
        try:
            ray.shutdown()
        finally:
            if guard is not None:
                guard.close()


@contextlib.contextmanager
def local_auth_mode() -> Iterator[None]:
    """Quiet Ray's notice that token authentication is on, for a local instance the run starts itself.

    Since Ray 2.59 a new local ``ray.init()`` turns token authentication on when ``RAY_AUTH_MODE`` is unset (a token
    is generated once into ``~/.ray/auth_token``) and says so in a warning on every run. That is the protection we
    want: the instance listens on the node's address, and without a token anyone who reaches it can run code, so we
    keep it (``RAY_AUTH_MODE=disabled`` would silence the notice by removing the protection) and drop just that one
    notice. Setting ``RAY_AUTH_MODE=token`` ourselves does not work once Ray is imported (its native config has read
    the variable already). Ray's warning that authentication is *off* is never filtered.
    """
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    quiet = _DropMessage("Token authentication is enabled for this Ray cluster")
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)
