"""The driver: plan, lock the output folder, clean up, ingest, make the LLM roles reachable, execute, check, report.

The pieces, each in its own module: ``plan`` (stage keys, folders, the order check), ``output_lock`` (one writer per
output folder), ``ingest_step``, ``llm.services`` (endpoints, the embedded server), ``scheduler`` (which shard runs
next: pipelining, resume, healing, repairs, retries, timeouts) over an ``Executor`` (``ray_executor``: one actor pool
per stage; ``local_executor``: the driver's own process), ``health`` (the error share) and ``summary`` (progress,
``latest.json``). Each worker writes and commits its own output shard (``shards``), so the driver moves file names,
never records: a killed driver loses nothing committed, and the rerun skips every committed shard.

Start-up overlaps: when ingest has work to do, it runs on a helper thread while the main thread starts Ray and the
first stage's actors (Ray must be started from the main thread: its head processes die with the thread that started
them). A rerun with nothing to do never starts Ray.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
import uuid
from typing import Any, Callable, Iterator

from .config import RunConfig
from .dataset_card import write_dataset_card
from .hashing import stable_hash
from .health import run_problems
from .ingest_step import ingest_complete, run_ingest
from .keyed import table_dir
from .llm.config import LLMConfig
from .output_lock import OutputLock, RunLockedError
from .plan import RunPlan, plan_run
from .scheduler import Executor, Scheduler, ShardBook, Watchdog
from .shards import MANIFEST, remove_stale_temporaries, write_json_atomic
from .storage import is_remote
from .stage import StageContext
from .summary import RunResult, StageProgress, run_summary, stage_totals

log = logging.getLogger(__name__)

__all__ = ["RunLockedError", "RunResult", "StageProgress", "execute", "run", "stage_contexts", "stage_totals"]


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


@contextlib.contextmanager
def llm_service_scope(config: RunConfig, plan: RunPlan) -> Iterator[LLMConfig | None]:
    """The resolved LLM config for every role the planned stages call (starting the embedded server, or a role's
    managed replicas on the Ray cluster, if some role needs them; stopped when the block exits), or None when no
    stage calls an LLM. Managed replicas are Ray actors, so Ray starts here, before them; the executor reuses it."""
    roles: set[str] = set()
    for s in plan.stages:
        roles |= s.cls.llm_roles(s.config)
    if not roles:
        yield None
        return
    from gmner_pipeline.llm.services import llm_services, managed_roles  # only needed by LLM-driven stages

    with contextlib.ExitStack() as stack:
        if managed_roles(config.llm, roles):
            from .ray_executor import ray_session

            stack.enter_context(ray_session(config))
        yield stack.enter_context(llm_services(config.llm, roles))


def stage_contexts(plan: RunPlan, config: RunConfig, run_id: str, llm: LLMConfig | None,
                   lock_file: str = "") -> list[StageContext]:
    """What each stage's workers are told: run id, key, seed, the dataset split, the resolved LLM config with every
    endpoint's ``max_concurrency`` divided among the actors that call it, and the lock the driver holds."""
    config_hash = stable_hash(config.to_dict())
    if llm is not None:
        from gmner_pipeline.llm.services import divide_concurrency

        llm = divide_concurrency(llm, [(s.cls.llm_roles(s.config), s.config.resources.pool_size)
                                       for s in plan.stages])
    return [StageContext(run_id=run_id, stage_key=s.key, config_hash=config_hash, seed=config.run.seed,
                         output_dir=str(plan.output_dir), dataset=config.dataset,
                         llm=llm if s.cls.llm_roles(s.config) else None, lock_file=lock_file,
                         driver_host=socket.gethostname() if lock_file else "")
            for s in plan.stages]


def clean_temporaries(plan: RunPlan) -> int:
    """Remove what killed processes left (temporary files and folders) in every folder this run writes: the output
    root (a dataset being published), ``cache/``, the ingest folder, every planned stage folder and a keyed stage's
    table folder (``keyed.py``). Every run does it, also one with nothing else to do. Only while holding the output
    lock."""
    folders = [plan.output_dir, plan.output_dir / "cache", plan.ingest.dir, *(s.dir for s in plan.stages),
               *(table_dir(s.dir) for s in plan.stages if s.cls.keyed())]  # a keyed stage's table units
    removed = sum(remove_stale_temporaries(f) for f in folders)
    if removed:
        log.info("removed %d temporary files left by an interrupted run", removed)
    return removed


class Backend:
    """Where shards run: builds the executor the run asks for (``run.executor``), starting Ray only when a shard needs
    it, or earlier when ``start()`` is called (to overlap its start with ingest). Closing it releases every worker and
    stops a Ray instance it started."""

    def __init__(self, config: RunConfig, plan: RunPlan, contexts: list[StageContext]):
        self.config = config
        self.plan = plan
        self.contexts = contexts
        self._stack = contextlib.ExitStack()
        self._executor: Executor | None = None

    @property
    def uses_ray(self) -> bool:
        return self.config.run.executor == "ray"

    def start(self, prestart: int | None = None) -> None:
        """Start the executor now (Ray: the instance, and the actors of stage ``prestart`` when given)."""
        executor = self.executor()
        if prestart is not None and prestart < len(self.plan.stages) and hasattr(executor, "prestart"):
            executor.prestart(prestart)

    def executor(self) -> Executor:
        if self._executor is None:
            run = self.config.run
            if self.uses_ray:
                from .ray_executor import RayExecutor, ray_session

                ray = self._stack.enter_context(ray_session(self.config))
                self._executor = RayExecutor(ray, self.plan.stages, self.contexts, run.actor_restarts)
            else:
                from .local_executor import LocalExecutor

                self._executor = LocalExecutor(self.plan.stages, self.contexts, run.shard_timeout_s,
                                               run.stall_timeout_s)
        return self._executor

    def watchdog(self) -> Watchdog | None:
        """Ray workers are watched from the driver; an in-process shard checks its own time between batches."""
        return Watchdog(self.config.run.shard_timeout_s, self.config.run.stall_timeout_s) if self.uses_ray else None

    def close(self) -> None:
        try:
            if self._executor is not None:
                for k in range(len(self.plan.stages)):
                    with contextlib.suppress(Exception):
                        self._executor.release(k)
        finally:
            self._stack.close()

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ingest_beside(ingest: Callable[[threading.Event], dict[str, Any]], start: Callable[[], None]) -> dict[str, Any]:
    """Run ``ingest`` on a helper thread while ``start`` runs on this one; returns ingest's result. When either fails
    (or Ctrl-C arrives), ingest is told to stop and waited for before the error goes on: nothing may write in the
    output folder once the run lets go of its lock."""
    stop = threading.Event()
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            box["result"] = ingest(stop)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            box["error"] = exc

    thread = threading.Thread(target=body, name="ingest", daemon=True)
    thread.start()
    try:
        start()
        thread.join()
    except BaseException:
        stop.set()
        thread.join()
        raise
    if "error" in box:
        raise box["error"]
    return box["result"]


def execute(plan: RunPlan, config: RunConfig, num_shards: int, backend: Backend,
            on_progress: Callable[[dict[str, StageProgress]], None] | None = None) -> dict[str, StageProgress]:
    """Run every planned stage over every ingest shard; returns per-stage progress (with failures)."""
    book = ShardBook(plan, num_shards, config.run.redo_errors)
    if book.idle:
        return book.progress
    for s in plan.stages:
        s.dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(s.dir / MANIFEST, s.manifest())
        write_dataset_card(s.dir, s.manifest())  # so that datasets.load_dataset(s.dir) reads the shards only
    return Scheduler(book, backend.executor(), config.run.shard_attempts, backend.watchdog()).run(on_progress)


def publish(plan: RunPlan, config: RunConfig, run_id: str, ok: bool) -> dict[str, int] | None:
    """Rebuild ``<output>/dataset`` (D1, D2, D2_filtered) when the run wrote CoT chains and every shard completed."""
    writes = set().union(*(s.cls.writes for s in plan.stages)) if plan.stages else set()
    if "cot" not in writes:
        return None
    if not ok:
        log.warning("dataset not republished: some shards failed (rerun the same command to finish them)")
        return None
    from .publish import publish_dataset

    return publish_dataset(plan.final_dir, plan.output_dir, config.dataset, with_filtered="grpo" in writes,
                           run_id=run_id)


def after_run(plan: RunPlan, progress: dict[str, StageProgress]) -> dict[str, dict[str, Any]]:
    """Each stage's end-of-run entry (``Stage.after_run``: its reports), for the stages whose shards all committed. A
    report that fails is logged and noted in the summary; the committed data stands either way."""
    entries: dict[str, dict[str, Any]] = {}
    for s in plan.stages:
        sp = progress.get(s.name)
        if sp is None or sp.failed or sp.done < sp.total:
            continue
        try:
            entry = s.cls.after_run(s.config, s.dir, plan.output_dir)
        except Exception as exc:  # noqa: BLE001 - a report must not hide a finished run's data
            log.exception("stage %s: its end-of-run report failed", s.name)
            entry = {"summary": f"end-of-run report failed: {type(exc).__name__}: {exc}"}
        if entry is not None:
            entries[s.name] = entry
    return entries


def run(config: RunConfig, stages: list[str] | None = None,
        on_progress: Callable[[dict[str, StageProgress]], None] | None = None,
        on_plan: Callable[[RunPlan, dict[str, Any]], None] | None = None) -> RunResult:
    """Plan, lock the output folder, clean up, ingest, check the stages can run, execute, check the output, write
    the run summary. ``RunResult.ok`` is False when shards failed or too many records ended in error."""
    t0 = time.perf_counter()
    run_id = new_run_id()
    plan = plan_run(config, stages)
    out = plan.output_dir
    with OutputLock(out) as lock:
        for s in plan.stages:  # fail before any work when a stage cannot run (weights, endpoints, files)
            s.cls.preflight(s.config)
        write_json_atomic(out / "runs" / run_id / "config.json", config.to_dict())
        (out / "config.yaml").write_text(config.to_yaml(), encoding="utf-8")
        clean_temporaries(plan)
        with llm_service_scope(config, plan) as llm:
            for s in plan.stages:  # the resolved roles: identities, endpoints
                if llm is not None and s.cls.llm_roles(s.config):
                    s.cls.preflight_llm(s.config, llm)
            contexts = stage_contexts(plan, config, run_id, llm, lock_file=str(lock.path))
            with Backend(config, plan, contexts) as backend:
                def ingest(stop: threading.Event | None = None) -> dict[str, Any]:
                    return run_ingest(plan.ingest, config.source, out / "cache", run_id, stop=stop)

                if backend.uses_ray and plan.stages and ingest_complete(plan.ingest) is None:
                    summary_of_ingest = ingest_beside(ingest, lambda: backend.start(prestart=0))
                else:
                    summary_of_ingest = ingest()
                if on_plan:
                    on_plan(plan, summary_of_ingest)
                progress = execute(plan, config, summary_of_ingest["num_shards"], backend, on_progress)
        # Ray is down by now: publishing and the stages' end-of-run reports read committed shards in the driver
        dataset = publish(plan, config, run_id, ok=not any(sp.failed for sp in progress.values()))
        reports = after_run(plan, progress)
        result = RunResult(run_id, plan, progress, summary_of_ingest, time.perf_counter() - t0, dataset, reports)
        result.problems = run_problems(result, config.run.max_error_share)
        summary = run_summary(result)
        write_json_atomic(out / "runs" / run_id / "summary.json", summary)
        write_json_atomic(out / "latest.json", summary)
        if config.card.enabled and result.ok:
            write_run_card(out)
    return result


def write_run_card(output_dir: Any) -> None:
    """The dataset card of the finished run (``<output>/README.md`` and its plots). A card that cannot be written is
    a warning: the run's data stands, and ``gmner-pipeline card <output>`` can write it later."""
    from .card import write_card

    if is_remote(output_dir):  # the card and its plots are written and read as a local folder
        log.info("dataset card: not written into a bucket; copy the output folder and run `gmner-pipeline card` "
                 "on the copy")
        return
    t0 = time.perf_counter()
    try:
        path = write_card(output_dir)
    except Exception as exc:  # noqa: BLE001 - a report must not fail a finished run
        log.warning("dataset card not written (%s: %s); retry with `gmner-pipeline card %s`", type(exc).__name__,
                    exc, output_dir)
        return
    log.info("dataset card: %s (%.1f s)", path, time.perf_counter() - t0)
