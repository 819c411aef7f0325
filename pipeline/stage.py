"""What a stage is, for the runner.

A stage is a module in ``stages/`` with pure functions over records (prompt building, parsing, scoring, keep/drop
decisions) plus one small class that subclasses ``Stage``:

* ``name`` / ``version``: the version is part of the stage's output key; bump it when the output would change.
* ``Config``: a pydantic model (subclass of ``StageConfig``) for the stage's section of the YAML config.
* ``preflight(config)``: a classmethod the driver calls BEFORE the run starts; raise ``StageSetupError`` with a message
  that says what to do (e.g. "weights not found at X: download them with ..."), never fall back to random weights.
* ``setup()``: load models / open clients, once per worker process.
* ``__call__(records) -> records``: process one batch. Return every input record (same ids, same count): put failures
  on the record (``mark_error``), drops as ``mark_dropped``, never lose a record. Records whose status is not ``ok``
  arrive too and must be passed through untouched (``active`` helps).
* ``close()``: release resources.

Stage modules must not import Ray: the runner (``gmner_pipeline.runner``) wraps the class into a Ray actor pool with
the resources from ``config.resources``. That keeps stages testable as plain Python.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Iterable

from pydantic import BaseModel, ConfigDict, Field

from .schema import STATUS_DROPPED, STATUS_ERROR, STATUS_OK
from .splits import DatasetConfig

Record = dict[str, Any]


class StageSetupError(RuntimeError):
    """A stage cannot run as configured (missing weights, unreachable endpoint, ...). The message says what to do."""


class Resources(BaseModel):
    """Ray resources for a stage's actor pool. Not part of the stage key: changing them recomputes nothing."""

    model_config = ConfigDict(extra="forbid")
    num_cpus: float = Field(0.5, ge=0, description="CPUs reserved per actor (fractions let small machines share)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor; >0 only on machines with GPUs")
    pool_size: int = Field(1, ge=1, description="actors in the pool")
    max_in_flight: int = Field(2, ge=1, description="shards queued per actor (2 overlaps IO with compute)")


class StageConfig(BaseModel):
    """Base of every stage's config. ``resources`` is excluded from the stage key."""

    model_config = ConfigDict(extra="forbid")
    resources: Resources = Field(default_factory=Resources)
    batch_size: int = Field(64, ge=1, description="records per call of the stage within a shard")

    def key_payload(self) -> dict[str, Any]:
        """The part of the config that determines the stage's output (everything but resources)."""
        return self.model_dump(mode="json", exclude={"resources"})


class StageContext(BaseModel):
    """What the runner tells a stage instance about the run it belongs to."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    run_id: str = "local"
    stage_key: str = ""
    config_hash: str = ""
    seed: int = 0
    output_dir: str = ""
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)  # the D1/D2 split (splits.dataset_split)
    # The whole resolved run config as a plain dict (e.g. the `llm` section for LLM-driven stages).
    run_config: dict[str, Any] = Field(default_factory=dict)


class Stage:
    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    Config: ClassVar[type[StageConfig]] = StageConfig
    reads: ClassVar[frozenset[str]] = frozenset()  # column groups (schema.COLUMN_GROUPS) the stage needs
    writes: ClassVar[frozenset[str]] = frozenset()  # column groups the stage fills

    def __init__(self, config: StageConfig, context: StageContext | None = None):
        self.config = config
        self.context = context or StageContext()

    @classmethod
    def preflight(cls, config: StageConfig) -> None:
        """Check, in the driver and before any work, that the stage can run (weights, endpoints, files)."""

    @classmethod
    def llm_roles(cls, config: StageConfig) -> set[str]:
        """The LLM roles (keys of the run config's ``llm.roles``) this stage calls; the runner makes sure each has a
        reachable endpoint (starting the embedded local server for roles with none) before the run starts."""
        return set()

    def setup(self) -> None:
        pass

    def __call__(self, records: list[Record]) -> list[Record]:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        pass

    # --- helpers for subclasses -------------------------------------------------------------------------------------

    def lineage_entry(self, *, model_ids: Iterable[str] = (), prompt_hash: str | None = None,
                      prompt_tokens: int = 0, completion_tokens: int = 0, seconds: float = 0.0) -> dict[str, Any]:
        return {
            "stage": self.name,
            "stage_version": self.version,
            "stage_key": self.context.stage_key,
            "config_hash": self.context.config_hash,
            "run_id": self.context.run_id,
            "model_ids": list(model_ids),
            "prompt_hash": prompt_hash,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "seconds": seconds,
        }


def active(record: Record) -> bool:
    """True when a stage should work on the record (earlier stages neither dropped it nor failed on it)."""
    return record.get("status") == STATUS_OK


def mark_error(record: Record, stage: str, message: str) -> Record:
    record["status"] = STATUS_ERROR
    record["error"] = message
    record["error_stage"] = stage
    return record


def mark_dropped(record: Record, stage: str, reason: str, message: str | None = None) -> Record:
    record["status"] = STATUS_DROPPED
    record["drop_reason"] = reason
    record["error_stage"] = stage
    if message:
        record["error"] = message
    return record


class Timer:
    """``with Timer() as t: ...; t.seconds``: wall time for lineage entries."""

    def __enter__(self) -> "Timer":
        self._t0 = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0
