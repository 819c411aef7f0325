"""The one owner of the training splits: which records are D1 (SFT, MCR's MRSI) and which are D2 (GRPO, CVO).

MCR builds a multi-style CoT set D_R, trains SFT on a subset D1 and GRPO on the rest, D2 = D_R \\ D1 (method-spec
§Stage 4). The split is made per RECORD, never per chain, so that no record's chains land on both sides, and it is a
pure function of the record id, the seed and the D1 fraction (sha256, never Python's salted ``hash()``): the same
record falls on the same side in every run, process and machine, whatever the sharding.

Only records from the source splits listed in ``training_splits`` (default: ``train``) can enter D1 or D2. Dev and
test records never do: ``dataset_split`` returns None for them, and a test guards it.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

from pydantic import Field

from .configbase import Strict

D1, D2 = "D1", "D2"
TrainingSplit = Literal["D1", "D2"]


class DatasetConfig(Strict):
    """The ``dataset:`` section of a run config."""

    d1_fraction: float = Field(0.5, ge=0.0, le=1.0, description="share of the training records that go to D1 (SFT); "
                               "the rest is D2 (GRPO). MCR does not state its split (project decision: 0.5)")
    split_seed: int | None = Field(None, description="seed of the D1/D2 assignment (default: run.seed)")
    training_splits: list[str] = Field(default_factory=lambda: ["train"],
                                       description="source splits whose records may enter D1/D2; dev and test "
                                       "records never do")

    def seed(self, run_seed: int) -> int:
        return run_seed if self.split_seed is None else self.split_seed


def assign_split(record_id: str, seed: int, d1_fraction: float) -> TrainingSplit:
    """D1 or D2 for a record id: a uniform draw in [0, 1) from sha256(seed, id), D1 below ``d1_fraction``."""
    digest = hashlib.sha256(f"{seed}\x1f{record_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return D1 if u < d1_fraction else D2


def is_training_record(record: dict[str, Any], config: DatasetConfig) -> bool:
    """True when the record's source split may enter D1/D2 (a record with no split never does)."""
    return record.get("split") in config.training_splits


def dataset_split(record: dict[str, Any], config: DatasetConfig, run_seed: int) -> TrainingSplit | None:
    """The record's training split, or None when it is not a training record (dev, test, unknown split)."""
    if not is_training_record(record, config):
        return None
    return assign_split(record["id"], config.seed(run_seed), config.d1_fraction)
