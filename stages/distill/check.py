"""The gold check: the one place that decides whether a chain is kept, for every style.

A chain is kept (``consistent``) only when all of these hold, checked in this order; the first that fails is the
chain's rejection reason (a short code, counted per style in the stage stats, plus a detail for humans):

=================  ===================================================================================================
``truncated``      the server stopped at ``max_tokens`` (``finish_reason: length``): the answer may be cut
``unparsable``     the answer is not fully read by ``gmner_pipeline.answer.parse_answer`` (the one parser)
``wrong_answer``   the parsed triples, boxes mapped back to original pixels, fail ``scoring.matches_gold`` under the
                   evaluation rules (``EvalConfig``: same entity text and type, IoU >= 0.5 with a gold box or both
                   None, nothing missing, nothing extra)
``short_think``    the answer is right but there is no ``<think>`` part, or it is shorter than ``min_think_chars``
``leaks_labels``   the reasoning says the answer was handed over ("the gold answer", "the given labels", ...):
                   a student trained on it would learn to expect labels that it never gets
=================  ===================================================================================================

Boxes come back from a teacher in its coordinate frame (``frames.py``); every box literal of the answer and of the
reasoning is mapped to original-image pixels before the comparison and before anything is stored.

The stored answer of a kept chain is, by default (``answer_from: gold``), the gold triples written in the order the
teacher gave them: the teacher's boxes matched the gold boxes at IoU >= 0.5 after the conversion, and a training
target should carry the exact gold box rather than the teacher's rounding of it. ``answer_from: teacher`` stores the
teacher's own (converted) boxes instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
from pydantic import Field

from gmner_pipeline.answer import Triple, extract_answer, extract_think, format_answer, parse_answer, same_triples
from gmner_pipeline.configbase import Frozen
from gmner_pipeline.frames import ORIGINAL, FrameConfig, FrameError, boxes_from_frame, text_from_frame
from gmner_pipeline.scoring import EvalConfig, matches_gold
from gmner_pipeline.scoring.evaluate import max_matching

TRUNCATED, UNPARSABLE, WRONG_ANSWER = "truncated", "unparsable", "wrong_answer"
SHORT_THINK, LEAKS_LABELS = "short_think", "leaks_labels"
REASONS = (TRUNCATED, UNPARSABLE, WRONG_ANSWER, SHORT_THINK, LEAKS_LABELS)

# Phrases that give away that the teacher was shown the answer. Matched case-insensitively inside <think>.
DEFAULT_LEAK_PHRASES = (
    "gold answer", "gold label", "gold annotation", "gold standard", "ground truth", "ground-truth",
    "given label", "given annotation", "given answer", "provided label", "provided annotation", "provided answer",
    "annotation to explain", "annotation provided", "labels provided", "reference answer", "expected answer",
    "the labels say", "according to the label", "according to the annotation",
)


class CheckConfig(Frozen):
    """How chains are judged (``stages.distill.check``); part of the stage key and of every style's key."""

    eval: EvalConfig = Field(default_factory=EvalConfig, description="the evaluation rules an answer must pass "
                             "(scoring.EvalConfig: IoU threshold, entity text comparison, label set)")
    leak_phrases: tuple[str, ...] = Field(DEFAULT_LEAK_PHRASES, description="a chain whose reasoning contains one of "
                                          "these (case-insensitive) is rejected as leaks_labels")
    min_think_chars: int = Field(40, ge=0, description="a right answer whose <think> part is shorter than this "
                                 "(after stripping) is rejected as short_think")
    answer_from: Literal["gold", "teacher"] = Field(
        "gold", description="the stored answer of a kept chain: the gold triples in the teacher's order (exact gold "
        "boxes), or the teacher's own boxes mapped to original pixels")


@dataclass(frozen=True)
class Verdict:
    """The outcome of checking one assistant turn. ``think`` and ``answer`` are in original pixels."""

    consistent: bool
    reason: str | None
    detail: str | None
    think: str
    answer: str

    @property
    def rejection(self) -> str | None:
        return None if self.consistent else f"{self.reason}: {self.detail}"


def check_turn(text: str, gold: Sequence[Triple], *, frame: FrameConfig = ORIGINAL,
               size: tuple[int, int] | None = None, config: CheckConfig | None = None,
               finish_reason: str | None = None) -> Verdict:
    """Judge one assistant turn written in ``frame`` (``size`` = the original image's width and height, needed for
    any frame but ``original``) against the gold triples (original pixels)."""
    config = config or CheckConfig()
    think_raw = extract_think(text)
    to_original = _converter(frame, size)
    think = to_original(think_raw or "")

    def reject(reason: str, detail: str, answer: str | None = None) -> Verdict:
        if answer is None:
            answer = to_original(extract_answer(text)).strip()
        return Verdict(False, reason, detail, think, answer)

    if finish_reason == "length":
        return reject(TRUNCATED, "the answer reached max_tokens (finish_reason: length)")
    parsed = parse_answer(text, config.eval.types)
    if not parsed.ok:
        return reject(UNPARSABLE, f"answer not fully parsable ({parsed.status}): "
                                  f"{'; '.join(parsed.errors)[:300] or 'no answer text'}")
    try:
        pred = [_triple_from_frame(t, frame, size) for t in parsed.triples]
    except FrameError as exc:
        return reject(UNPARSABLE, f"boxes cannot be mapped from the {frame.kind} frame: {exc}")
    answer = format_answer(pred)
    # identical at the answer's integer precision is right under any evaluation rule that accepts IoU 1 (a fast path:
    # matches_gold solves an assignment problem, and template chains and copying teachers are always identical)
    exact = same_triples(pred, gold) and not (config.eval.strict_iou and config.eval.iou_threshold >= 1.0)
    if not exact and not matches_gold(pred, gold, config.eval):
        return reject(WRONG_ANSWER, "parsed answer differs from gold: " + describe_difference(pred, gold, config.eval),
                      answer)
    stripped = (think_raw or "").strip()
    if len(stripped) < max(1, config.min_think_chars):
        what = "no <think> part" if think_raw is None else f"<think> has {len(stripped)} characters"
        return reject(SHORT_THINK, f"{what}, fewer than {max(1, config.min_think_chars)}", answer)
    lowered = stripped.lower()
    leak = next((p for p in config.leak_phrases if p.lower() in lowered), None)
    if leak is not None:
        return reject(LEAKS_LABELS, f"the reasoning says {leak!r}", answer)
    if config.answer_from == "gold":
        answer = format_answer(gold_in_teacher_order(pred, gold, config.eval, exact=exact))
    return Verdict(True, None, None, think, answer)


def _converter(frame: FrameConfig, size: tuple[int, int] | None):
    if frame.kind == "original":
        return lambda text: text
    if size is None:
        raise FrameError(f"a {frame.kind} frame needs the image's width and height")
    return lambda text: text_from_frame(text, size[0], size[1], frame)


def _triple_from_frame(t: Triple, frame: FrameConfig, size: tuple[int, int] | None) -> Triple:
    if frame.kind == "original" or t.boxes is None:
        return t
    if size is None:
        raise FrameError("the image size is unknown")
    return Triple(t.entity, t.type, boxes_from_frame(t.boxes, size[0], size[1], frame))


def gold_in_teacher_order(pred: Sequence[Triple], gold: Sequence[Triple], eval_config: EvalConfig,
                          exact: bool = False) -> list[Triple]:
    """The gold triples in the order of the predicted triples they match (a one-to-one matching under the
    evaluation rules); gold triples left unmatched (none, for a consistent answer) keep their order at the end.
    ``exact``: the prediction is the gold at integer precision (``same_triples``), matched by that key."""
    if exact:
        pool: dict[tuple, list[Triple]] = {}
        for g in gold:
            pool.setdefault(_key(g), []).append(g)
        return [pool[_key(p)].pop(0) for p in pred]
    ok = np.array([[matches_gold([p], [g], eval_config) for g in gold] for p in pred],
                  dtype=bool).reshape(len(pred), len(gold))
    by_pred = dict(max_matching(ok))
    used = set(by_pred.values())
    return [gold[by_pred[i]] for i in range(len(pred)) if i in by_pred] + [
        g for j, g in enumerate(gold) if j not in used]


def _key(t: Triple) -> tuple:
    boxes = None if t.boxes is None else tuple(sorted(tuple(int(round(v)) for v in b) for b in t.boxes))
    return (t.entity, t.type, boxes)


def describe_difference(pred: Sequence[Triple], gold: Sequence[Triple], eval_config: EvalConfig) -> str:
    """What separates a prediction from gold, in words: missing and unexpected entity|TYPE pairs, wrong locations."""
    def key(t: Triple) -> str:
        return f"{t.entity}|{t.type}"

    missing = [key(g) for g in gold]
    extra = []
    for p in pred:
        if key(p) in missing:
            missing.remove(key(p))
        else:
            extra.append(key(p))
    wrong_location = [key(p) for p in pred if key(p) not in extra
                      and not any(key(g) == key(p) and matches_gold([p], [g], eval_config) for g in gold)]
    parts = []
    if missing:
        parts.append(f"missing {missing[:5]}")
    if extra:
        parts.append(f"unexpected {extra[:5]}")
    if wrong_location:
        parts.append(f"wrong location for {wrong_location[:5]}")
    return "; ".join(parts) or f"{len(pred)} triple(s) against {len(gold)} gold"
