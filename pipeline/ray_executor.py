"""The Ray backend of the scheduler: one actor pool per stage, each actor one worker process with its stage set up.

Recovery: a worker process that dies is restarted by Ray and its shard retried (``max_restarts`` /
``max_task_retries``); when Ray gives up, the shard comes back to the scheduler as failed and the actor is replaced.
A shard goes only to an actor that is up: an actor Ray cannot place (a pool larger than the cluster) must not hold
shards that would wait on it forever.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator

from .config import RunConfig
from .plan import StagePlan
from .scheduler import ShardOutcome, Task
from .stage import StageContext

log = logging.getLogger(__name__)


@contextlib.contextmanager
def ray_session(config: RunConfig) -> Iterator[Any]:
    """Join ``run.ray_address`` (or ``RAY_ADDRESS``), or start a local Ray instance; reuse one already initialised."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    address = config.run.ray_address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
    with contextlib.ExitStack() as stack:
        if address:
            kwargs["address"] = address
        else:
            if config.run.num_cpus is not None:
                kwargs["num_cpus"] = config.run.num_cpus
            if config.run.object_store_memory is not None:
                kwargs["object_store_memory"] = config.run.object_store_memory
            stack.enter_context(local_auth_mode())
        ray.init(**kwargs)
        try:
            yield ray
        finally:
            ray.shutdown()


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


class ShardActor:
    """The Ray actor body: one stage instance per worker process (setup once, then shard after shard)."""

    def __init__(self, stage_name: str, config: dict[str, Any], context: dict[str, Any]):
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        for noisy in ("httpx", "httpx2", "openai", "urllib3", "filelock"):  # one line per LLM request otherwise
            logging.getLogger(noisy).setLevel(logging.WARNING)
        from gmner_pipeline.stages import load_stage
        from gmner_pipeline.worker import ShardProcessor

        cls = load_stage(stage_name)
        self.processor = ShardProcessor(cls, cls.Config.model_validate(config), StageContext(**context))

    def run(self, task: Task) -> dict[str, Any]:
        """A shard, or a unit of a keyed stage's table (``ShardProcessor.run``)."""
        import ray

        return self.processor.run(task, extra_stats={"node_id": ray.get_runtime_context().get_node_id()})

    def pid(self) -> int:
        return os.getpid()

    def close(self) -> None:
        self.processor.close()


class ActorPool:
    """The actors of one stage, with how many shards each has in flight and whether it is up yet."""

    def __init__(self, ray: Any, stage: StagePlan, context: StageContext, restarts: int):
        res = stage.config.resources
        self._factory = ray.remote(ShardActor).options(
            num_cpus=res.num_cpus, num_gpus=res.num_gpus, max_restarts=restarts, max_task_retries=restarts,
        )
        self._args = (stage.name, stage.config.model_dump(mode="json"), context.model_dump(mode="json"))
        self.max_in_flight = res.max_in_flight
        self.actors: list[Any] = [None] * res.pool_size
        self.load = [0] * res.pool_size
        self.up = [False] * res.pool_size
        self.solo = [False] * res.pool_size  # running a retried shard, alone
        self.starting: dict[Any, int] = {}  # ref of an actor's first call -> its slot
        for slot in range(res.pool_size):
            self.replace(slot)

    def free_slot(self, alone: bool = False) -> int | None:
        """A slot for one more shard; ``alone``: an idle one, kept for that shard only (a retried shard may be the
        one that kills its worker, and must not take the shards queued beside it down again)."""
        limit = 1 if alone else self.max_in_flight
        slots = [i for i in range(len(self.actors)) if self.up[i] and not self.solo[i] and self.load[i] < limit]
        return min(slots, key=self.load.__getitem__) if slots else None

    def started(self, ref: Any) -> None:
        """The actor's first call returned (or failed: then its shards fail and go through the retry path)."""
        self.up[self.starting.pop(ref)] = True

    def replace(self, slot: int) -> None:
        self.starting = {ref: s for ref, s in self.starting.items() if s != slot}
        self.actors[slot] = self._factory.remote(*self._args)
        self.load[slot] = 0
        self.up[slot] = False
        self.solo[slot] = False
        self.starting[self.actors[slot].pid.remote()] = slot

    def kill(self, ray: Any, close_timeout_s: float = 60.0) -> None:
        """Let every started actor close its stage (release resources, log its stats), then end the processes."""
        closing = [actor.close.remote() for actor, up in zip(self.actors, self.up) if up]
        if closing:
            with contextlib.suppress(Exception):
                ray.wait(closing, num_returns=len(closing), timeout=close_timeout_s)
        for actor in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(actor)


@dataclass
class _Running:
    task: Task
    slot: int
    actor: Any


class RayExecutor:
    """The scheduler's ``Executor`` on Ray: pools are created when their stage first gets work."""

    def __init__(self, ray: Any, stages: list[StagePlan], contexts: list[StageContext], restarts: int):
        self.ray = ray
        self.stages = stages
        self.contexts = contexts
        self.restarts = restarts
        self.pools: dict[int, ActorPool] = {}
        self.running: dict[Any, _Running] = {}

    def _pool(self, k: int) -> ActorPool:
        if k not in self.pools:
            self.pools[k] = ActorPool(self.ray, self.stages[k], self.contexts[k], self.restarts)
        return self.pools[k]

    def submit(self, task: Task) -> bool:
        pool = self._pool(task.stage)
        slot = pool.free_slot(task.alone)
        if slot is None:
            return False
        actor = pool.actors[slot]
        ref = actor.run.remote(task)
        pool.load[slot] += 1
        pool.solo[slot] = task.alone
        self.running[ref] = _Running(task, slot, actor)
        return True

    def in_flight(self) -> int:
        return len(self.running)

    def starting(self, stage: int) -> bool:
        return bool(stage in self.pools and self.pools[stage].starting)

    def wait(self, timeout: float) -> list[ShardOutcome]:
        starting = {ref: k for k, pool in self.pools.items() for ref in pool.starting}
        done, _ = self.ray.wait([*self.running, *starting], num_returns=1, timeout=timeout)
        outcomes = []
        for ref in done:
            if ref in starting:
                self.pools[starting[ref]].started(ref)
                continue
            run = self.running.pop(ref)
            pool = self.pools[run.task.stage]
            same_actor = pool.actors[run.slot] is run.actor  # not already replaced after another shard failed
            if same_actor:
                pool.load[run.slot] = max(0, pool.load[run.slot] - 1)
                pool.solo[run.slot] = pool.solo[run.slot] and not run.task.alone
            try:
                outcomes.append(ShardOutcome(run.task, stats=self.ray.get(ref)))
            except Exception as exc:  # noqa: BLE001 - every failure goes back to the scheduler, per shard
                if isinstance(exc, self.ray.exceptions.RayActorError) and same_actor:
                    pool.replace(run.slot)
                outcomes.append(ShardOutcome(run.task, error=exc))
        return outcomes

    def release(self, stage: int) -> None:
        pool = self.pools.pop(stage, None)
        if pool is not None:
            pool.kill(self.ray)
