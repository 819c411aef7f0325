"""The driver: plan, ingest, then stream shards through one Ray actor pool per stage.

Shard ``i`` moves to stage ``k+1`` as soon as stage ``k`` committed it, so the stages work concurrently on different
shards. Each actor writes and commits its own output shard (see shards.py), so the driver moves file names, never
records. Recovery:

* a worker process that dies is restarted by Ray and its shard is retried (``max_restarts`` / ``max_task_retries``);
  when Ray gives up, the driver replaces the actor and tries the shard again (``run.shard_attempts`` in all);
* a killed driver loses nothing committed: the rerun skips every shard whose commit marker exists;
* a shard that still fails is reported (stage, shard, error) and the run goes on with the others; the command
  exits non-zero and a rerun picks the failed shards up.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .config import RunConfig, stable_hash
from .dataset_card import write_dataset_card
from .ingest_step import run_ingest
from .plan import RunPlan, StagePlan, plan_run
from .shards import MANIFEST, committed_indices, marker_path, read_markers, remove_stale_temporaries, \
    shard_path, write_json_atomic
from .stage import StageContext

log = logging.getLogger(__name__)

class RunLockedError(RuntimeError):
    pass


@dataclass
class StageProgress:
    name: str
    total: int
    done: int = 0
    processed_now: int = 0  # shards processed in this run (not reused)
    records_now: int = 0
    started: float | None = None
    finished: float | None = None  # when its last shard of this run came back (its rate ends there)
    failed: list[tuple[int, str]] = field(default_factory=list)

    @property
    def records_per_s(self) -> float:
        if not self.started or not self.records_now:
            return 0.0
        end = self.finished if self.finished is not None else time.perf_counter()
        return self.records_now / max(end - self.started, 1e-9)


@dataclass
class RunResult:
    run_id: str
    plan: RunPlan
    stages: dict[str, StageProgress]
    ingest: dict[str, Any]
    seconds: float

    @property
    def failed(self) -> list[tuple[str, int, str]]:
        return [(name, shard, err) for name, sp in self.stages.items() for shard, err in sp.failed]

    @property
    def ok(self) -> bool:
        return not self.failed


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


@contextlib.contextmanager
def output_lock(output_dir: Path) -> Iterator[None]:
    """One writer per output folder: a second concurrent run would race on shards. The OS drops the lock when the
    process dies, so a killed run never leaves a stale lock behind."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / ".lock"
    fh = open(path, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "unknown"
        fh.close()
        raise RunLockedError(f"another gmner-pipeline run (pid {holder}) is writing to {output_dir}; wait for it, "
                             "or use another --set run.output_dir=...") from None
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    try:
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


# --- Ray -------------------------------------------------------------------------------------------------------------

class ShardActor:
    """The Ray actor body: one stage instance per worker process (setup once, then shard after shard)."""

    def __init__(self, stage_name: str, config: dict[str, Any], context: dict[str, Any]):
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        from gmner_pipeline.stages import load_stage
        from gmner_pipeline.worker import ShardProcessor

        cls = load_stage(stage_name)
        self.processor = ShardProcessor(cls, cls.Config.model_validate(config), StageContext(**context))

    def process(self, index: int, in_path: str, out_dir: str) -> dict[str, Any]:
        import ray

        return self.processor.process(index, in_path, out_dir,
                                      extra_stats={"node_id": ray.get_runtime_context().get_node_id()})

    def pid(self) -> int:
        return os.getpid()

    def close(self) -> None:
        self.processor.close()


@contextlib.contextmanager
def ray_session(config: RunConfig) -> Iterator[Any]:
    import ray

    if ray.is_initialized():
        yield ray
        return
    address = config.run.ray_address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
    if address:
        kwargs["address"] = address
    else:
        if config.run.num_cpus is not None:
            kwargs["num_cpus"] = config.run.num_cpus
        if config.run.object_store_memory is not None:
            kwargs["object_store_memory"] = config.run.object_store_memory
    ray.init(**kwargs)
    try:
        yield ray
    finally:
        ray.shutdown()


class _Pool:
    """The actors of one stage, with how many shards each has in flight. A shard goes only to an actor that is up:
    an actor Ray cannot place (a pool larger than the cluster) must not hold shards that would wait on it forever."""

    def __init__(self, ray: Any, stage: StagePlan, context: dict[str, Any], restarts: int):
        res = stage.config.resources
        self._factory = ray.remote(ShardActor).options(
            num_cpus=res.num_cpus, num_gpus=res.num_gpus, max_restarts=restarts, max_task_retries=restarts,
        )
        self._args = (stage.name, stage.config.model_dump(mode="json"), context)
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


def execute(plan: RunPlan, config: RunConfig, run_id: str, num_shards: int,
            on_progress: Callable[[dict[str, StageProgress]], None] | None = None) -> dict[str, StageProgress]:
    """Run every planned stage over every ingest shard; returns per-stage progress (with failures)."""
    stages = plan.stages
    progress = {s.name: StageProgress(s.name, num_shards) for s in stages}
    if not stages:
        return progress
    committed = [committed_indices(s.dir) for s in stages]
    ready: list[deque[int]] = [deque() for _ in stages]
    for shard in range(num_shards):
        for k, done in enumerate(committed):
            if shard not in done:
                ready[k].append(shard)
                # Downstream shards made from the output this stage is about to replace are void: keeping them
                # would pair a new upstream shard with results computed from the old one.
                for j in range(k + 1, len(stages)):
                    if shard in committed[j]:
                        marker_path(stages[j].dir, shard).unlink(missing_ok=True)
                        committed[j].discard(shard)
                break
    for s, done in zip(stages, committed):
        progress[s.name].done = len(done & set(range(num_shards)))
    pending = [num_shards - progress[s.name].done for s in stages]
    if not any(pending):
        return progress

    config_hash = stable_hash(config.to_dict())
    for s in stages:
        s.dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(s.dir)
        write_json_atomic(s.dir / MANIFEST, s.manifest())
        write_dataset_card(s.dir, s.manifest())  # so that datasets.load_dataset(s.dir) reads the shards only

    with ray_session(config) as ray:
        pools: dict[int, _Pool] = {}
        in_flight: dict[Any, tuple[int, int, int, Any, bool]] = {}  # ref -> (stage k, shard, slot, actor, alone)
        attempts: dict[tuple[int, int], int] = {}

        def input_path(k: int, shard: int) -> Path:
            return shard_path(plan.ingest.dir if k == 0 else stages[k - 1].dir, shard)

        def submit_ready() -> None:
            for k, queue in enumerate(ready):
                while queue:
                    if k not in pools:
                        ctx = StageContext(run_id=run_id, stage_key=stages[k].key, config_hash=config_hash,
                                           seed=config.run.seed, output_dir=str(plan.output_dir),
                                           run_config=config.to_dict())
                        pools[k] = _Pool(ray, stages[k], ctx.model_dump(), config.run.actor_restarts)
                        progress[stages[k].name].started = time.perf_counter()
                    alone = attempts.get((k, queue[0]), 0) > 0
                    slot = pools[k].free_slot(alone)
                    if slot is None:
                        break
                    shard = queue.popleft()
                    actor = pools[k].actors[slot]
                    ref = actor.process.remote(shard, str(input_path(k, shard)), str(stages[k].dir))
                    pools[k].load[slot] += 1
                    pools[k].solo[slot] = alone
                    in_flight[ref] = (k, shard, slot, actor, alone)

        def finish_stage_if_done(k: int) -> None:
            # A stage's pool is released once no shard can reach it any more, freeing CPUs/GPUs for later stages.
            upstream_busy = any(pending[j] for j in range(k))
            if k in pools and pending[k] == 0 and not upstream_busy:
                pools.pop(k).kill(ray)

        def waiting_for_actors() -> bool:
            return any(ready[k] and pools[k].starting for k in pools)

        submit_ready()
        while in_flight or waiting_for_actors():
            starting = {ref: k for k, pool in pools.items() for ref in pool.starting}
            done_refs, _ = ray.wait([*in_flight, *starting], num_returns=1, timeout=1.0)
            for ref in done_refs:
                if ref in starting:
                    pools[starting[ref]].started(ref)
                    continue
                k, shard, slot, actor, alone = in_flight.pop(ref)
                pool = pools[k]
                same_actor = pool.actors[slot] is actor  # not already replaced after another of its shards failed
                if same_actor:
                    pool.load[slot] = max(0, pool.load[slot] - 1)
                    pool.solo[slot] = pool.solo[slot] and not alone
                sp = progress[stages[k].name]
                try:
                    stats = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - every failure is handled per shard below
                    n = attempts[(k, shard)] = attempts.get((k, shard), 0) + 1
                    actor_died = isinstance(exc, (ray.exceptions.RayActorError,))
                    if actor_died and same_actor:
                        pool.replace(slot)
                    if n < config.run.shard_attempts:
                        log.warning("%s shard %d failed (attempt %d/%d): %s; retrying", stages[k].name, shard, n,
                                    config.run.shard_attempts, _short(exc))
                        ready[k].appendleft(shard)
                    else:
                        log.error("%s shard %d failed %d times, giving up for this run: %s", stages[k].name, shard,
                                  n, _short(exc))
                        sp.failed.append((shard, _short(exc)))
                        pending[k] -= 1
                        for j in range(k + 1, len(stages)):  # it can never reach the later stages in this run
                            if shard not in committed[j]:
                                pending[j] -= 1
                                progress[stages[j].name].failed.append((shard, f"upstream {stages[k].name} failed"))
                else:
                    sp.done += 1
                    sp.processed_now += 1
                    sp.records_now += stats.get("records_in", 0)
                    pending[k] -= 1
                    nxt = k + 1
                    while nxt < len(stages) and shard in committed[nxt]:
                        nxt += 1  # already done downstream (e.g. an interrupted earlier run got further)
                    if nxt < len(stages):
                        ready[nxt].append(shard)
                for j in range(len(stages)):
                    if pending[j] == 0 and progress[stages[j].name].finished is None:
                        progress[stages[j].name].finished = time.perf_counter()
                    finish_stage_if_done(j)
            submit_ready()
            if on_progress:
                on_progress(progress)
        for pool in pools.values():
            pool.kill(ray)
    return progress


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[-1] if text else type(exc).__name__)[:500]


# --- the whole run ---------------------------------------------------------------------------------------------------

def llm_service_scope(config: RunConfig, plan: RunPlan) -> contextlib.AbstractContextManager:
    """Make sure every LLM role the planned stages call has an endpoint (starting the embedded server if needed)."""
    roles: set[str] = set()
    for s in plan.stages:
        roles |= s.cls.llm_roles(s.config)
    if not roles:
        return contextlib.nullcontext()
    from gmner_pipeline.llm.services import llm_services  # only needed by LLM-driven stages

    return _resolved_llm(config, llm_services(config.llm, roles))


@contextlib.contextmanager
def _resolved_llm(config: RunConfig, scope: Any) -> Iterator[None]:
    with scope as resolved:
        original = config.llm
        config.llm = resolved
        try:
            yield
        finally:
            config.llm = original


def run(config: RunConfig, stages: list[str] | None = None,
        on_progress: Callable[[dict[str, StageProgress]], None] | None = None,
        on_plan: Callable[[RunPlan, dict[str, Any]], None] | None = None) -> RunResult:
    """Plan, lock the output folder, ingest, check the stages can run, execute, write the run summary."""
    t0 = time.perf_counter()
    run_id = new_run_id()
    plan = plan_run(config, stages)
    out = plan.output_dir
    with output_lock(out):
        for s in plan.stages:  # fail before any work when a stage cannot run (weights, endpoints, files)
            s.cls.preflight(s.config)
        write_json_atomic(out / "runs" / run_id / "config.json", config.to_dict())
        (out / "config.yaml").write_text(config.to_yaml(), encoding="utf-8")
        ingest = run_ingest(plan.ingest, config.source, out / "cache", run_id)
        if on_plan:
            on_plan(plan, ingest)
        with llm_service_scope(config, plan):
            progress = execute(plan, config, run_id, ingest["num_shards"], on_progress)
        result = RunResult(run_id, plan, progress, ingest, time.perf_counter() - t0)
        summary = run_summary(result)
        write_json_atomic(out / "runs" / run_id / "summary.json", summary)
        write_json_atomic(out / "latest.json", summary)
    return result


def run_summary(result: RunResult) -> dict[str, Any]:
    plan = result.plan
    chain = [{"stage": "ingest", "key": plan.ingest.key, "dir": str(plan.ingest.dir)}]
    chain += [{"stage": s.name, "key": s.key, "dir": str(s.dir), "version": s.cls.version} for s in plan.stages]
    return {
        "run_id": result.run_id,
        "seconds": round(result.seconds, 3),
        "ok": result.ok,
        "chain": chain,
        "final_dir": str(plan.final_dir),
        "ingest": result.ingest,
        "stages": {name: {"shards_total": sp.total, "shards_done": sp.done, "shards_processed_now": sp.processed_now,
                          "records_processed_now": sp.records_now, "records_per_s": round(sp.records_per_s, 2),
                          "failed": sp.failed}
                   for name, sp in result.stages.items()},
    }


def stage_totals(stage_dir: Path) -> dict[str, Any]:
    """Sum the commit markers of a stage folder (for status and summaries)."""
    totals: dict[str, Any] = {"shards": 0, "records_in": 0, "records_ok": 0, "records_dropped": 0,
                              "records_error": 0, "drop_reasons": {}, "errors_by_stage": {}, "seconds": 0.0}
    for stats in read_markers(stage_dir).values():
        totals["shards"] += 1
        for k in ("records_in", "records_ok", "records_dropped", "records_error"):
            totals[k] += stats.get(k, 0)
        totals["seconds"] += stats.get("seconds", 0.0) or 0.0
        for group in ("drop_reasons", "errors_by_stage"):
            for reason, n in (stats.get(group) or {}).items():
                totals[group][reason] = totals[group].get(reason, 0) + n
    return totals
