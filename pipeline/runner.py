"""The driver: plan, lock the output folder, ingest, make the LLM roles reachable, execute, write the summary.

The pieces, each in its own module: ``plan`` (stage keys, folders, the order check), ``output_lock`` (one writer per
output folder), ``ingest_step``, ``llm.services`` (endpoints, the embedded server), ``scheduler`` (which shard runs
next: pipelining, resume, retries) over an ``Executor`` (``ray_executor``: one actor pool per stage) and ``summary``
(progress, ``latest.json``). Each actor writes and commits its own output shard (``shards``), so the driver moves file
names, never records: a killed driver loses nothing committed, and the rerun skips every committed shard.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from typing import Any, Callable, Iterator

from .config import RunConfig
from .dataset_card import write_dataset_card
from .hashing import stable_hash
from .ingest_step import run_ingest
from .keyed import table_dir
from .llm.config import LLMConfig
from .output_lock import OutputLock, RunLockedError
from .plan import RunPlan, plan_run
from .scheduler import Scheduler, ShardBook
from .shards import MANIFEST, remove_stale_temporaries, write_json_atomic
from .stage import StageContext
from .summary import RunResult, StageProgress, run_summary, stage_totals

log = logging.getLogger(__name__)

__all__ = ["RunLockedError", "RunResult", "StageProgress", "execute", "run", "stage_contexts", "stage_totals"]


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


@contextlib.contextmanager
def llm_service_scope(config: RunConfig, plan: RunPlan) -> Iterator[LLMConfig | None]:
    """The resolved LLM config for every role the planned stages call (starting the embedded server if some role
    needs it; stopped when the block exits), or None when no stage calls an LLM."""
    roles: set[str] = set()
    for s in plan.stages:
        roles |= s.cls.llm_roles(s.config)
    if not roles:
        yield None
        return
    from gmner_pipeline.llm.services import llm_services  # only needed by LLM-driven stages

    with llm_services(config.llm, roles) as resolved:
        yield resolved


def stage_contexts(plan: RunPlan, config: RunConfig, run_id: str, llm: LLMConfig | None) -> list[StageContext]:
    """What each stage's workers are told: run id, key, seed, the dataset split, and the resolved LLM config with
    every endpoint's ``max_concurrency`` divided among the actors that call it."""
    config_hash = stable_hash(config.to_dict())
    if llm is not None:
        from gmner_pipeline.llm.services import divide_concurrency

        llm = divide_concurrency(llm, [(s.cls.llm_roles(s.config), s.config.resources.pool_size)
                                       for s in plan.stages])
    return [StageContext(run_id=run_id, stage_key=s.key, config_hash=config_hash, seed=config.run.seed,
                         output_dir=str(plan.output_dir), dataset=config.dataset,
                         llm=llm if s.cls.llm_roles(s.config) else None)
            for s in plan.stages]


def execute(plan: RunPlan, config: RunConfig, num_shards: int, contexts: list[StageContext],
            on_progress: Callable[[dict[str, StageProgress]], None] | None = None) -> dict[str, StageProgress]:
    """Run every planned stage over every ingest shard on Ray; returns per-stage progress (with failures)."""
    book = ShardBook(plan, num_shards)
    if book.idle:
        return book.progress
    for s in plan.stages:
        s.dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(s.dir)
        remove_stale_temporaries(table_dir(s.dir))  # a keyed stage's table units (keyed.py)
        write_json_atomic(s.dir / MANIFEST, s.manifest())
        write_dataset_card(s.dir, s.manifest())  # so that datasets.load_dataset(s.dir) reads the shards only
    from .ray_executor import RayExecutor, ray_session

    with ray_session(config) as ray:
        executor = RayExecutor(ray, plan.stages, contexts, config.run.actor_restarts)
        return Scheduler(book, executor, config.run.shard_attempts).run(on_progress)


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
    """Plan, lock the output folder, ingest, check the stages can run, execute, write the run summary."""
    t0 = time.perf_counter()
    run_id = new_run_id()
    plan = plan_run(config, stages)
    out = plan.output_dir
    with OutputLock(out):
        for s in plan.stages:  # fail before any work when a stage cannot run (weights, endpoints, files)
            s.cls.preflight(s.config)
        write_json_atomic(out / "runs" / run_id / "config.json", config.to_dict())
        (out / "config.yaml").write_text(config.to_yaml(), encoding="utf-8")
        ingest = run_ingest(plan.ingest, config.source, out / "cache", run_id)
        if on_plan:
            on_plan(plan, ingest)
        with llm_service_scope(config, plan) as llm:
            for s in plan.stages:  # the resolved roles: identities, endpoints
                if llm is not None and s.cls.llm_roles(s.config):
                    s.cls.preflight_llm(s.config, llm)
            contexts = stage_contexts(plan, config, run_id, llm)
            progress = execute(plan, config, ingest["num_shards"], contexts, on_progress)
        dataset = publish(plan, config, run_id, ok=not any(sp.failed for sp in progress.values()))
        reports = after_run(plan, progress)
        result = RunResult(run_id, plan, progress, ingest, time.perf_counter() - t0, dataset, reports)
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

    t0 = time.perf_counter()
    try:
        path = write_card(output_dir)
    except Exception as exc:  # noqa: BLE001 - a report must not fail a finished run
        log.warning("dataset card not written (%s: %s); retry with `gmner-pipeline card %s`", type(exc).__name__,
                    exc, output_dir)
        return
    log.info("dataset card: %s (%.1f s)", path, time.perf_counter() - t0)
