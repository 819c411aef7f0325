"""What a stage is (the contract; docs/writing-a-stage.md is the one-screen guide).

A stage is a module in ``stages/`` with pure functions over records (prompt building, parsing, scoring, keep/drop
decisions) plus one small ``Stage`` subclass:

* ``name`` / ``version``: the version is part of the stage's output key; bump it when the output would change.
* ``Config``: a pydantic model (subclass of ``StageConfig``) for the stage's section of the YAML config.
* ``reads`` / ``writes``: the column groups (``schema.COLUMN_GROUPS``) it needs and fills; the plan refuses a pipeline
  whose order cannot provide what a stage reads, before anything runs.
* ``preflight(config)`` (classmethod, in the driver, before the run): raise ``StageSetupError`` saying what to do.
* ``llm_roles(config)`` (classmethod): the LLM roles it calls; the runner makes each one reachable.
* ``setup()``: load models, open clients; once per worker process. ``close()``: release them (safe without setup).
* ``after_run(config, stage_dir, output_dir)`` (classmethod, in the driver, after the run): stage-level reports.
* ``process(records)`` or ``async aprocess(records)``: work on the records it is handed and return them (same ids).
* optional, a **keyed table** (``keyed.py``): ``table_keys(record)`` names what a record needs that belongs to a key
  rather than to the record (an entity's knowledge); ``build_table(items)`` / ``async abuild_table(items)`` computes
  it once per key over the stage's whole input; ``process`` then finds the values of its batch's keys in
  ``self.table``.

The framework (``Stage.__call__``, used by the runner and ``gmner_pipeline.testing.run_stage``) hands ``process`` only
the records whose status is ok (and that ``accepts``), passes the others through untouched, and appends each handled
record's lineage entry, with the usage the stage reported through ``self.usage(record, ...)``. ``aprocess`` runs on
the worker's one event loop (``self.llm``), shared by every LLM role of the stage.

Stage modules must not import Ray: the runner wraps the class into an actor pool with the resources from
``config.resources``. That keeps stages testable as plain Python.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable

from pydantic import Field

from .configbase import Strict
from .keyed import TableKey
from .llm.config import LLMConfig
from .llm.context import LLMContext
from .schema import ERROR_PERMANENT, ERROR_TRANSIENT, STATUS_DROPPED, STATUS_ERROR, STATUS_OK
from .splits import DatasetConfig

Record = dict[str, Any]


class StageSetupError(RuntimeError):
    """A stage cannot run as configured (missing weights, unreachable endpoint, ...). The message says what to do."""


class StageContractError(RuntimeError):
    """The stage returned records that do not match its input (lost, added or renamed records): a bug in the stage,
    so the shard fails loudly instead of committing."""


class TransientError(RuntimeError):
    """Raise it (or let an OS timeout, connection error or out-of-memory error escape) for a record whose failure is
    not the record's fault: the record is saved as an error of kind ``transient``, and a rerun redoes it."""


def error_kind_of(exc: BaseException) -> str:
    """``transient`` for failures a rerun can cure (timeouts, lost connections, out of memory, ``TransientError``),
    ``permanent`` otherwise (a bad record, a bug)."""
    if isinstance(exc, (TransientError, TimeoutError, ConnectionError, MemoryError)):
        return ERROR_TRANSIENT
    text = f"{type(exc).__name__}: {exc}".lower()
    if "outofmemoryerror" in text or "out of memory" in text:  # torch.OutOfMemoryError, CUDA/HIP OOM messages
        return ERROR_TRANSIENT
    return ERROR_PERMANENT


class Resources(Strict):
    """Ray resources for a stage's actor pool. Not part of the stage key: changing them recomputes nothing."""

    num_cpus: float = Field(0.5, ge=0, description="CPUs reserved per actor (fractions let small machines share)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor; >0 only on machines with GPUs")
    pool_size: int = Field(1, ge=1, description="actors in the pool")
    max_in_flight: int = Field(2, ge=1, description="shards queued per actor (2 overlaps IO with compute)")
    table_units: int = Field(8, ge=1, description="keyed stages only: work units of the keyed table pass (each one "
                             "task on the pool; more units spread the pass over more actors)")


class StageConfig(Strict):
    """Base of every stage's config. ``resources`` is excluded from the stage key."""

    resources: Resources = Field(default_factory=Resources)
    batch_size: int = Field(64, ge=1, description="records per call of the stage within a shard")

    def key_payload(self) -> dict[str, Any]:
        """The part of the config that determines the stage's output (everything but resources)."""
        return self.model_dump(mode="json", exclude={"resources"})


class StageContext(Strict):
    """What the runner tells a stage instance about the run it belongs to (typed, resolved; no raw config)."""

    run_id: str = "local"
    stage_key: str = ""
    config_hash: str = ""
    seed: int = 0
    output_dir: str = ""
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)  # the D1/D2 split (splits.dataset_split)
    llm: LLMConfig | None = None  # resolved endpoints for the stage's roles, concurrency already divided per actor
    lock_file: str = ""  # the output folder's lock the driver holds; workers commit only while it is held
    driver_host: str = ""  # the driver's host: only workers on it test the lock (see output_lock.driver_alive)


@dataclass
class Usage:
    """What handling one record cost, for its lineage entry (``Stage.usage`` adds to it)."""

    model_ids: list[str] = field(default_factory=list)
    prompt_hash: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float | None = None


class Stage:
    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    Config: ClassVar[type[StageConfig]] = StageConfig
    reads: ClassVar[frozenset[str]] = frozenset()  # column groups (schema.COLUMN_GROUPS) the stage needs
    writes: ClassVar[frozenset[str]] = frozenset()  # column groups the stage fills
    # keyed stages: the columns the table pass reads (None: all); id and status are always read
    table_columns: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, config: StageConfig, context: StageContext | None = None):
        """The framework's: a stage builds its state in ``setup()``, not here."""
        self.config = config
        self.context = context or StageContext()
        self.llm = LLMContext(self.context.llm, self.llm_roles(config))
        # lineage defaults for every record this stage handles (set them in setup; ``usage`` overrides per record)
        self.model_ids: list[str] = []
        self.prompt_hash: str | None = None
        self._usage: dict[str, Usage] = {}
        self._counters: Counter[str] = Counter()
        self.table: dict[str, Any] = {}  # keyed stages: the table's values for the current batch's keys
        self._table_source: Any = None  # keyed.TableFiles / InMemoryTable, attached by the framework

    # --- what a stage defines -----------------------------------------------------------------------------------

    @classmethod
    def preflight(cls, config: StageConfig) -> None:
        """Check, in the driver and before any work, that the stage can run (weights, endpoints, files)."""

    @classmethod
    def llm_roles(cls, config: StageConfig) -> set[str]:
        """The LLM roles (keys of the run config's ``llm.roles``) this stage calls; the runner makes sure each has a
        reachable endpoint (starting the embedded local server for roles with none) before the run starts."""
        return set()

    @classmethod
    def reads_for(cls, config: StageConfig) -> frozenset[str]:
        """The column groups this config reads (default ``reads``); override when it depends on the config."""
        return cls.reads

    @classmethod
    def after_run(cls, config: StageConfig, stage_dir: Path, output_dir: Path) -> dict[str, Any] | None:
        """In the driver, once per run, when every shard of this stage is committed (reused ones too): write
        stage-level reports from the committed shards under ``output_dir`` and return a small JSON-able entry for the
        end-of-run summary (its ``"summary"`` string is printed), or None (the default: nothing to report)."""
        return None

    def accepts(self, record: Record) -> bool:
        """Among the records whose status is ok, the ones this stage works on (default: all). The others pass
        through untouched, without a lineage entry (retrieve: only records without an image)."""
        return True

    def setup(self) -> None:
        """Load models, open clients: once per worker process, before the first batch."""

    def process(self, records: list[Record]) -> list[Record]:
        """Work on a batch of records (status ok, accepted); return them, same ids. Mark failures on the record
        (``mark_error``) and drops with ``mark_dropped``; never lose one."""
        raise NotImplementedError(f"stage {self.name!r} defines neither process() nor aprocess()")

    async def aprocess(self, records: list[Record]) -> list[Record]:
        """``process`` as a coroutine, run on the worker's event loop: fan out LLM requests across the batch."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what ``setup`` built (log the stage's counters); safe to call when ``setup`` did not run."""

    # --- a keyed table (optional; keyed.py) -------------------------------------------------------------------------

    def table_keys(self, record: Record) -> Iterable[TableKey]:
        """Define it to make the stage keyed: what this (ok, accepted) record needs from the keyed table, as
        ``TableKey(key, item, rank)``. Must be a pure function of the record and the config: the table pass and the
        shard pass both call it."""
        return ()

    def build_table(self, items: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Compute one JSON-able value per key from its item (the item of the key's first occurrence, see
        ``TableKey``); return exactly the keys given. A failure that belongs to one key is a value (the shard pass
        turns it into a per-record error), not an exception: an exception fails the whole unit, which is retried."""
        raise NotImplementedError(f"keyed stage {self.name!r} defines neither build_table() nor abuild_table()")

    async def abuild_table(self, items: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """``build_table`` as a coroutine on the worker's event loop (fan out LLM requests across the keys)."""
        raise NotImplementedError

    @classmethod
    def keyed(cls) -> bool:
        """True when the stage builds a keyed table (defines ``table_keys``)."""
        return cls.table_keys is not Stage.table_keys

    @classmethod
    def preflight_llm(cls, config: StageConfig, llm: LLMConfig) -> None:
        """Check, in the driver, the resolved LLM roles the stage will call (identities, endpoints): warn, or raise
        ``StageSetupError`` saying what to do. Runs after ``preflight`` once the servers are known."""

    # --- what a stage calls ---------------------------------------------------------------------------------------

    def usage(self, record: Record, *, results: Iterable[Any] = (), model_ids: Iterable[str] = (),
              prompt_hash: str | None = None, prompt_tokens: int = 0, completion_tokens: int = 0,
              seconds: float | None = None) -> None:
        """Add to what this record cost, for its lineage entry: ``results`` (``LLMResult``s: their model identities,
        tokens and latency), or the fields themselves. Calls add up; ``prompt_hash`` replaces the stage's default."""
        u = self._usage.setdefault(record["id"], Usage())
        results = list(results)
        if results:
            from .llm.accounting import lineage_usage

            summed = lineage_usage(results)
            model_ids = [*model_ids, *summed["model_ids"]]
            prompt_tokens += summed["prompt_tokens"]
            completion_tokens += summed["completion_tokens"]
            seconds = (seconds or 0.0) + summed["seconds"]
        u.model_ids += [m for m in model_ids if m not in u.model_ids]
        u.prompt_hash = prompt_hash or u.prompt_hash
        u.prompt_tokens += prompt_tokens
        u.completion_tokens += completion_tokens
        if seconds is not None:
            u.seconds = (u.seconds or 0.0) + seconds

    def count(self, event: str, n: int = 1) -> None:
        """Count an event of this stage (``"generator_failed:timeout"``, ``"rejected:leaks_labels"``): summed per
        shard into its commit marker (``counters``), per stage in ``status`` and the end-of-run summary. Use it for
        what records do not show by themselves: per-entity or per-chain outcomes, retries, cache hits."""
        if n:
            self._counters[event] += n

    def attach_table(self, source: Any) -> None:
        """The framework's: where ``self.table`` comes from (``keyed.TableFiles`` in a run)."""
        self._table_source = source

    def compute_table(self, items: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """The framework's: run ``abuild_table``/``build_table`` on a unit's items and check it returned each key."""
        if not items:
            return {}
        if type(self).abuild_table is not Stage.abuild_table:
            values = self.llm.run(self.abuild_table(items))
        else:
            values = self.build_table(items)
        if not isinstance(values, dict) or set(values) != set(items):
            got = set(values) if isinstance(values, dict) else set()
            raise StageContractError(f"stage {self.name}: build_table must return a value for exactly the keys it "
                                     f"was given; missing {sorted(set(items) - got)[:5]}, "
                                     f"extra {sorted(got - set(items))[:5]}")
        return values

    def take_counters(self) -> dict[str, int]:
        """The counts since the last call (the framework's: one call per shard)."""
        out, self._counters = dict(self._counters), Counter()
        return out

    # --- the framework ----------------------------------------------------------------------------------------------

    def __call__(self, records: list[Record]) -> list[Record]:
        """Run the stage on a batch: only ok, accepted records reach ``process``/``aprocess``; the others come back
        untouched; every handled record gets its lineage entry. Stages do not override this."""
        self._usage = {}
        todo = [r for r in records if active(r) and self.accepts(r)]
        if not todo:
            return records
        t0 = time.perf_counter()
        if self.keyed():
            self.table = self._lookup_table(todo)
        if type(self).aprocess is not Stage.aprocess:
            out = self.llm.run(self.aprocess(todo))
        else:
            out = self.process(todo)
        share = (time.perf_counter() - t0) / len(todo)
        if not isinstance(out, list):
            raise StageContractError(f"stage {self.name}: process() must return the list of records it was given, "
                                     f"got {type(out).__name__}")
        check_contract(todo, out, self.name)
        handled = {r["id"]: r for r in out}
        result = []
        for rec in records:
            done = handled.get(rec["id"])
            if done is None:  # not handed to the stage: untouched
                result.append(rec)
                continue
            done["lineage"] = [*(done.get("lineage") or []), self._lineage(self._usage.get(rec["id"]), share)]
            result.append(done)
        return result

    def _lookup_table(self, records: list[Record]) -> dict[str, Any]:
        if self._table_source is None:
            raise RuntimeError(f"keyed stage {self.name!r} ran without its table: run it through the runner or "
                               "gmner_pipeline.testing.run_stage, which build the table first")
        return self._table_source.lookup(k.key for r in records for k in self.table_keys(r))

    def _lineage(self, usage: Usage | None, share: float) -> dict[str, Any]:
        u = usage or Usage()
        return {
            "stage": self.name,
            "stage_version": self.version,
            "stage_key": self.context.stage_key,
            "config_hash": self.context.config_hash,
            "run_id": self.context.run_id,
            "model_ids": u.model_ids or list(self.model_ids),
            "prompt_hash": u.prompt_hash or self.prompt_hash,
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens,
            "seconds": share if u.seconds is None else u.seconds,
        }


def check_contract(inputs: list[Record], outputs: list[Record], stage: str) -> None:
    """Every input record comes back exactly once (by id), none added."""
    a = Counter(r["id"] for r in inputs)
    b = Counter(r.get("id") for r in outputs)
    if a != b:
        lost = sorted((a - b).elements())[:5]
        added = sorted(map(str, (b - a).elements()))[:5]
        raise StageContractError(f"stage {stage} must return every input record exactly once; "
                                 f"lost {lost}, added {added}")


def active(record: Record) -> bool:
    """True when a stage should work on the record (earlier stages neither dropped it nor failed on it)."""
    return record.get("status") == STATUS_OK


def mark_error(record: Record, stage: str, message: str, *, transient: bool = False) -> Record:
    """Mark a record failed by ``stage``. ``transient``: the cause is outside the record (an endpoint down for the
    whole batch, retries exhausted, an OOM), so a rerun redoes it (``run.redo_errors``); for an LLM answer pass
    ``transient=result.transient``."""
    record["status"] = STATUS_ERROR
    record["error"] = message
    record["error_stage"] = stage
    record["error_kind"] = ERROR_TRANSIENT if transient else ERROR_PERMANENT
    return record


def mark_dropped(record: Record, stage: str, reason: str, message: str | None = None) -> Record:
    record["status"] = STATUS_DROPPED
    record["drop_reason"] = reason
    record["error_stage"] = stage
    if message:
        record["error"] = message
    return record
