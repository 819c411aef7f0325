"""The Ray backend of the scheduler: one actor pool per stage, each actor one worker process with its stage set up.

Recovery: a worker process that dies is restarted by Ray and its shard retried (``max_restarts`` /
``max_task_retries``); when Ray gives up, the shard comes back to the scheduler as failed and the actor is replaced.
A shard goes only to an actor that is up: an actor Ray cannot place (a pool larger than the cluster) must not hold
shards that would wait on it forever. A shard the scheduler's watchdog abandons (stuck, or its worker stopped) has its
actor killed and replaced; it comes back from ``wait`` as failed with the watchdog's reason.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from dataclasses import dataclass
from typing import Any

from .plan import StagePlan
from .ray_local import ray_session
from .scheduler import ShardOutcome, ShardTimeout, Task
from .stage import StageContext

__all__ = ["ActorPool", "RayExecutor", "ShardActor", "ray_session"]

log = logging.getLogger(__name__)


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

    def pid(self) -> tuple[int, str]:
        """The worker's process id and node: a stuck worker on the driver's node is ended by its pid."""
        import ray

        return os.getpid(), ray.get_runtime_context().get_node_id()

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
        self.process: list[tuple[int, str] | None] = [None] * res.pool_size  # (pid, node id) once up
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

    def started(self, ray: Any, ref: Any) -> None:
        """The actor's first call returned (or failed: then its shards fail and go through the retry path)."""
        slot = self.starting.pop(ref)
        self.up[slot] = True
        with contextlib.suppress(Exception):
            self.process[slot] = tuple(ray.get(ref))

    def replace(self, slot: int) -> None:
        self.starting = {ref: s for ref, s in self.starting.items() if s != slot}
        self.actors[slot] = self._factory.remote(*self._args)
        self.load[slot] = 0
        self.up[slot] = False
        self.process[slot] = None
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
        self.abandoned: dict[Any, str] = {}  # ref -> the watchdog's reason

    def prestart(self, stage: int) -> None:
        """Start the stage's actors now (they set up while the driver still ingests)."""
        self._pool(stage)

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
                self.pools[starting[ref]].started(self.ray, ref)
                continue
            run = self.running.pop(ref)
            pool = self.pools[run.task.stage]
            same_actor = pool.actors[run.slot] is run.actor  # not already replaced after another shard failed
            if same_actor:
                pool.load[run.slot] = max(0, pool.load[run.slot] - 1)
                pool.solo[run.slot] = pool.solo[run.slot] and not run.task.alone
            reason = self.abandoned.pop(ref, None)
            try:
                stats = self.ray.get(ref)
                outcomes.append(ShardOutcome(run.task, stats=stats) if reason is None
                                else ShardOutcome(run.task, error=ShardTimeout(reason)))
            except Exception as exc:  # noqa: BLE001 - every failure goes back to the scheduler, per shard
                if isinstance(exc, self.ray.exceptions.RayActorError) and same_actor:
                    pool.replace(run.slot)
                outcomes.append(ShardOutcome(run.task, error=ShardTimeout(reason) if reason else exc))
        return outcomes

    def abandon(self, task: Task, reason: str) -> None:
        """Kill the actor running ``task`` (a stopped process too: Ray ends it with SIGKILL) and start a new one in
        its slot; the task, and any other queued on that actor, come back failed and are retried."""
        for ref, run in self.running.items():
            if run.task == task:
                pool = self.pools[task.stage]
                self.abandoned[ref] = reason
                same = pool.actors[run.slot] is run.actor
                process = pool.process[run.slot] if same else None
                if process is not None and process[1] == self.ray.get_runtime_context().get_node_id():
                    with contextlib.suppress(OSError):  # Ray asks a worker to exit first: a stopped one never does
                        os.kill(process[0], signal.SIGKILL)
                with contextlib.suppress(Exception):
                    self.ray.kill(run.actor, no_restart=True)
                if same:
                    pool.replace(run.slot)
                return

    def release(self, stage: int) -> None:
        pool = self.pools.pop(stage, None)
        if pool is not None:
            pool.kill(self.ray)
