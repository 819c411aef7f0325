"""Pure functions of the GRPO filter: which records are sampled, the gold they are scored against, one group's
rewards and statistics, and the record's ``grpo`` column.

Every reward is THE project reward (``scoring.gmner_reward``) on the completion mapped back to original pixels by the
GRPO trainer's own function, with the gold read exactly as the trainer reads its ``gold`` column (the record's gold
answer string, through ``scoring.read_gold``), so that a group's statistics describe what GRPO will see for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from gmner_pipeline.answer import Triple, format_answer, gold_triples
from gmner_pipeline.frames import FrameConfig
from gmner_pipeline.publish import has_consistent_chain
from gmner_pipeline.schema import GROUNDING_ABSENT
from gmner_pipeline.scoring import GrpoFilterConfig, RewardBreakdown, RewardConfig, gmner_reward, grpo_column, read_gold
from gmner_pipeline.splits import D2
from gmner_pipeline.train.rewards import to_original_pixels  # the GRPO trainer's mapping: one function for both

INCOMPLETE = "incomplete_group"  # the grpo.reason of a group with a failed request (the record is an error)
SKIP_GROUNDING_ABSENT = "grounding_absent"


def wants_group(record: dict[str, Any]) -> bool:
    """A D2 record (GRPO data) with a consistent chain: what the filter samples (D1 and dev/test pass untouched)."""
    return (record.get("cot") or {}).get("split") == D2 and has_consistent_chain(record)


def skip_reason(record: dict[str, Any]) -> str | None:
    """Why a D2 record is not sampled, or None. Boxes unknown (text-only sources): every reward would punish a right
    answer for its visibility, and the GRPO trainer leaves such records out too."""
    return SKIP_GROUNDING_ABSENT if record.get("grounding_labels") == GROUNDING_ABSENT else None


def record_gold(record: dict[str, Any], types: Sequence[str]) -> list[Triple]:
    """The gold triples the trainer scores this record's completions against: the gold answer string in original
    pixels (as the trainer's ``gold`` column holds it) read back with the reward's label set. Raises ValueError (with
    what is wrong) for gold that cannot be scored."""
    gold, problem = read_gold(format_answer(gold_triples(record)), types)
    if gold is None:
        raise ValueError(f"gold of {record.get('id')!r} cannot be scored: {problem or 'no gold'}")
    return gold


def image_size(record: dict[str, Any]) -> tuple[int, int] | None:
    img = record.get("image") or {}
    w, h = img.get("width"), img.get("height")
    return (int(w), int(h)) if w and h else None


def score_group(completions: Sequence[str | None], gold: Sequence[Triple], size: tuple[int, int] | None,
                frame: FrameConfig, reward: RewardConfig) -> list[RewardBreakdown | None]:
    """Each completion's reward breakdown (None for a sample that never came back): its boxes mapped back from the
    policy's frame to original pixels by the trainer's own function (``train.rewards.to_original_pixels``), then
    ``gmner_reward``. An unparsable completion scores 0 (``gmner_reward`` never raises on model output)."""
    width, height = size or (None, None)
    return [None if text is None else gmner_reward(to_original_pixels(text, width, height, frame), gold, reward)
            for text in completions]


def stored_reward(value: float) -> float:
    """A reward as the shard stores it (float32). Statistics are computed on these values, so that a report redrawn
    from the shards (``grpo-report``) reaches exactly the stage's keep/drop decisions, even at a threshold."""
    return float(np.float32(value))


@dataclass(frozen=True)
class GroupOutcome:
    column: dict[str, Any]  # the record's grpo struct
    complete: bool  # every one of the G samples came back and was scored


def group_column(completions: Sequence[str | None], breakdowns: Sequence[RewardBreakdown | None], expected: int,
                 policy_id: str, config: GrpoFilterConfig) -> GroupOutcome:
    """The ``grpo`` struct of one record (``scoring.grpo_column``). A group with fewer than ``expected`` samples (a
    request that failed) keeps its G slots, the missing ones as null response and null reward, and is never kept
    (``reason = incomplete_group``): statistics over a shortened group are not the ones GRPO would see."""
    responses = list(completions) + [None] * (expected - len(completions))
    rewards = [None if b is None else stored_reward(b.total) for b in breakdowns]
    rewards += [None] * (expected - len(rewards))
    column = grpo_column(responses, rewards, policy_id, config)  # type: ignore[arg-type]
    complete = len(rewards) == expected and all(r is not None and math.isfinite(r) for r in rewards)
    if not complete:
        column.update(keep=False, reason=INCOMPLETE)
    return GroupOutcome(column, complete)


def zero_kind(breakdown: RewardBreakdown) -> str | None:
    """The zero rule that applied to a response, in one word for counters (``format``, ``unparsable``, ``partial``,
    ``empty``, ``skipped text``), or None."""
    reason = breakdown.zero_reason
    return None if reason is None else reason.split(":", 1)[0]
