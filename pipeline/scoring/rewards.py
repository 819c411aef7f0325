"""Verifiable rewards for GMNER answers: MCR's five components (MCR §4.2.1, App. D.1-D.2; method-spec §Stage 5) and a
format component, with guards so that a policy cannot collect reward without doing the task.

The two entry points (keep them stable: grpo_filter and the GRPO trainer call them):

* ``gmner_reward(completion, gold, config) -> RewardBreakdown``: one completion (the whole assistant turn) against
  the gold triples of its record. grpo_filter calls it for each of the G sampled completions of a record.
* ``make_trl_reward(config)``: a TRL ``GRPOTrainer`` reward function ``(prompts, completions, **columns) ->
  list[float | None]`` that calls ``gmner_reward`` on each row, so both consumers give identical numbers.

``RewardConfig()`` holds the safe defaults; ``RewardConfig.mcr()`` is MCR's rewards as published.

For a response with p predicted triples and a sample with q gold triples:

* R_c (count): 1 if p = q; max(0, 1 - (p - q) w_o(q)) if p > q > 0; max(0, 1 - (q - p) w_u(p)) if 0 < p < q; else 0.
* Pairs: token F1 of every predicted/gold span pair, F = 2w / (n + m) with w the longest CONTIGUOUS common token run,
  matched one-to-one by the Hungarian algorithm (maximum total F; k = min(p, q) pairs, fewer with
  ``drop_zero_overlap_pairs``). Among matchings with the same total F, the one agreeing best on type/visibility/box
  over the pairs that are KEPT is taken (so duplicate entity texts do not score by luck).
* R_s = sum of F, R_t = number of pairs with equal types, R_u = sum of max(0, (IoU - sigma) / (1 - sigma)) with IoU
  the best over the gold boxes (both None: ``both_none_grounding``, one None: 0), R_e = number of pairs agreeing on
  visible/None; each divided by max(p, q) (``pair_mean="max_pq"``, default: a spurious or missing entity counts 0)
  or by k (``"matched"``, MCR eq. 18).
* Format: 1 when the turn is exactly ``<think>…</think><answer>…</answer>`` (``answer.check_turn_format``), else 0.
* R = sum(lambda_i R_i), divided by sum(lambda) when ``normalize_weights`` (default) so that R lies in [0, 1].

Zero rules (project decisions; ``zero_reason`` in the breakdown says which one applied): a bad format with
``require_format`` -> every component and the total 0; an unparsable or empty answer, a partial one
(``partial_is_unparsable``), or one with skipped prose (``skipped_text_is_unparsable``) -> R_c..R_e 0 (the format
component keeps its value). k = 0 gives R_s = R_t = R_u = R_e = 0; p = q = 0 gives 1 on every component.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Callable, Collection, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from ..answer import (ParsedAnswer, Triple, boxes_from_value, check_turn_format, gold_triples, parse_answer,
                      preview)
from .boxes import location_iou
from .config import RewardConfig

log = logging.getLogger(__name__)

MCR_COMPONENTS = ("count", "span", "type", "grounding", "entailment")
COMPONENTS = (*MCR_COMPONENTS, "format")
_TIE_BREAK = 1e-6  # < any difference between two distinct sums of span F1 values of realistic entity lengths


@dataclass(frozen=True)
class RewardBreakdown:
    count: float
    span: float
    type: float
    grounding: float
    entailment: float
    format: float  # 1.0 when the turn has the strict format (check_turn_format), else 0.0
    total: float
    p: int
    q: int
    k: int
    status: str  # the parse status of the response
    zero_reason: str | None = None  # the rule that zeroed the components ("format: ...", "partial", ...), or None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def bracket_weight(n: int, brackets: Sequence[tuple[int, float]]) -> float:
    """The weight of the last bracket whose lower bound is <= n (0 below the first bracket)."""
    weight = 0.0
    for low, w in brackets:
        if n >= low:
            weight = w
    return weight


def count_reward(p: int, q: int, config: RewardConfig | None = None) -> float:
    config = config or RewardConfig()
    if p == q:
        return 1.0
    if p > q > 0:
        return max(0.0, 1.0 - (p - q) * bracket_weight(q, config.over_weights))
    if 0 < p < q:
        return max(0.0, 1.0 - (q - p) * bracket_weight(p, config.under_weights))
    return 0.0  # p = 0 < q, or p > q = 0


def longest_common_run(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest contiguous run of tokens common to a and b."""
    best = 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, start=1):
            if x == y:
                cur[j] = prev[j - 1] + 1
                best = max(best, cur[j])
        prev = cur
    return best


def span_f1(pred: Sequence[str], gold: Sequence[str]) -> float:
    """MCR eq. 16-17: P = w/n, R = w/m, F = 2PR/(P+R) = 2w/(n+m); 0 when either span is empty."""
    if not pred or not gold:
        return 0.0
    w = longest_common_run(pred, gold)
    return 2.0 * w / (len(pred) + len(gold))


def grounding_score(pred: Triple, gold: Triple, config: RewardConfig) -> float:
    if pred.boxes is None and gold.boxes is None:
        return config.both_none_grounding
    if pred.boxes is None or gold.boxes is None:
        return 0.0
    value = location_iou(pred.boxes, gold.boxes, config.pred_boxes)
    return max(0.0, (value - config.sigma) / (1.0 - config.sigma))


def reward_components(pred: Sequence[Triple] | ParsedAnswer, gold: Sequence[Triple],
                      config: RewardConfig | None = None) -> RewardBreakdown:
    """Every reward component for predicted triples (or a parsed answer) against gold triples. The turn's format is
    not seen here (``format`` is 1): ``gmner_reward`` checks it."""
    return _score(pred, gold, config or RewardConfig(), 1.0)


def gmner_reward(completion: str | None, gold: Sequence[Triple], config: RewardConfig | None = None) -> RewardBreakdown:
    """THE reward of one completion (a whole assistant turn) against the gold triples of its record.

    The completion is read by ``parse_answer`` with ``config.types`` (the one label set), and its format checked by
    ``check_turn_format``. Boxes in the completion and in ``gold`` must be in the same frame (the policy's:
    ``frames.boxes_to_frame`` puts gold there). Never raises on model output.
    """
    config = config or RewardConfig()
    text = completion or ""
    problem = check_turn_format(text)
    fmt = 0.0 if problem else 1.0
    parsed = parse_answer(text, config.types, max_chars=config.max_answer_chars, lookalike_bars=config.lookalike_bars)
    if problem is not None and config.require_format:
        return RewardBreakdown(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, len(parsed.triples), len(gold), 0, parsed.status,
                               f"format: {problem}")
    return _score(parsed, gold, config, fmt)


def _score(pred: Sequence[Triple] | ParsedAnswer, gold: Sequence[Triple], config: RewardConfig,
           fmt: float) -> RewardBreakdown:
    status = "ok"
    if isinstance(pred, ParsedAnswer):
        status = pred.status
        reason = _content_zero_reason(pred, config)
        if reason is not None:
            return _combine(config, (0.0, 0.0, 0.0, 0.0, 0.0, fmt), len(pred.triples), len(gold), 0, status, reason)
        pred = pred.triples
    pred, gold = list(pred), list(gold)
    p, q = len(pred), len(gold)
    if p == 0 and q == 0:
        return _combine(config, (1.0, 1.0, 1.0, 1.0, 1.0, fmt), 0, 0, 0, status)
    r_c = count_reward(p, q, config)
    pairs = _match(pred, gold, config)
    k = len(pairs)
    if k == 0:
        return _combine(config, (r_c, 0.0, 0.0, 0.0, 0.0, fmt), p, q, 0, status)
    fold = (lambda s: s) if config.case_sensitive else str.casefold
    n = max(p, q) if config.pair_mean == "max_pq" else k
    r_s = float(sum(f for _, _, f in pairs)) / n
    r_t = sum(fold(pred[i].type) == fold(gold[j].type) for i, j, _ in pairs) / n
    r_u = sum(grounding_score(pred[i], gold[j], config) for i, j, _ in pairs) / n
    r_e = sum((pred[i].boxes is None) == (gold[j].boxes is None) for i, j, _ in pairs) / n
    return _combine(config, (r_c, r_s, r_t, r_u, r_e, fmt), p, q, k, status)


def _content_zero_reason(parsed: ParsedAnswer, config: RewardConfig) -> str | None:
    if parsed.status in ("unparsable", "empty"):
        return parsed.status
    if parsed.status == "partial" and config.partial_is_unparsable:
        return "partial"
    if parsed.skipped and config.skipped_text_is_unparsable:
        return "skipped text"
    return None


def _match(pred: list[Triple], gold: list[Triple], config: RewardConfig) -> list[tuple[int, int, float]]:
    """The matched pairs (i, j, span F1): maximum total F, ties broken by agreement on type, visibility and box."""
    if not pred or not gold:
        return []
    fold = (lambda s: s) if config.case_sensitive else str.casefold
    p_tok = [fold(t.entity).split() for t in pred]
    g_tok = [fold(t.entity).split() for t in gold]
    f = np.array([[span_f1(a, b) for b in g_tok] for a in p_tok], dtype=np.float64)
    agree = np.array([[(fold(a.type) == fold(b.type)) + ((a.boxes is None) == (b.boxes is None))
                       + grounding_score(a, b, config) for b in gold] for a in pred], dtype=np.float64) / 3.0
    if config.drop_zero_overlap_pairs:
        agree *= f > 0  # a pair dropped below must not win the tie-break for the pairs that are kept
    eps = _TIE_BREAK / (min(len(pred), len(gold)) + 1)
    rows, cols = linear_sum_assignment(f + eps * agree, maximize=True)
    pairs = [(int(i), int(j), float(f[i, j])) for i, j in zip(rows, cols)]
    if config.drop_zero_overlap_pairs:
        pairs = [pair for pair in pairs if pair[2] > 0]
    return pairs


def _combine(config: RewardConfig, values: tuple[float, ...], p: int, q: int, k: int, status: str,
             zero_reason: str | None = None) -> RewardBreakdown:
    w = config.weights
    named = dict(zip(COMPONENTS, (float(v) for v in values)))
    total = sum(w.get(name, 0.0) * v for name, v in named.items())
    if config.normalize_weights:
        total /= sum(w.values())
    return RewardBreakdown(**named, total=float(total), p=p, q=q, k=k, status=status, zero_reason=zero_reason)


# --- TRL adapter ------------------------------------------------------------------------------------------------------

def completion_text(completion: Any) -> str:
    """The text of a TRL completion: a string (standard format) or a list of messages (conversational format, whose
    content may itself be a list of ``{"type": "text", "text": ...}`` parts)."""
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return completion_text(completion.get("content", completion.get("text", "")))
    if isinstance(completion, (list, tuple)):
        return "".join(completion_text(m) for m in completion)
    return str(completion)


def read_gold(value: Any, types: Collection[str] | None = None) -> tuple[list[Triple] | None, str | None]:
    """Gold triples from a dataset column -> (triples, None); (None, None) when there is no gold (None); (None, what is
    wrong) when the gold cannot be used. Accepts an E2E-GMNER answer string, record entities (``text``/``type``/
    ``boxes`` dicts, or ``{"entities": [...]}``), ``{"entity","type","boxes"}`` dicts, or Triples. Never raises: a
    bad coordinate (a 400-digit integer, NaN) is a problem on that row."""
    if value is None:
        return None, None
    try:
        return _read_gold(value, types)
    except Exception as exc:  # noqa: BLE001 - outside data: whatever it holds, the row is reported, not the run
        return None, f"unreadable gold ({type(exc).__name__}: {exc})"


def _read_gold(value: Any, types: Collection[str] | None) -> tuple[list[Triple] | None, str | None]:
    if isinstance(value, str):
        parsed = parse_answer(value, types=types, max_chars=None)
        if parsed.status != "ok":
            return None, f"gold answer {preview(value, 60)} is {parsed.status}: {'; '.join(parsed.errors)[:200]}"
        return parsed.triples, None
    if isinstance(value, dict) and "entities" in value:
        value = value["entities"]
    if not isinstance(value, (list, tuple)):
        return None, f"gold {preview(value, 60)} is not an answer string or a list of entities"
    out: list[Triple] = []
    for item in value:
        if isinstance(item, Triple):
            out.append(item)
        elif isinstance(item, dict) and "text" in item and "type" in item:
            try:
                out.extend(gold_triples({"entities": [item]}))
            except ValueError as exc:  # a box that is not four finite numbers
                return None, str(exc)
        elif isinstance(item, dict) and "entity" in item and "type" in item:
            boxes, err = boxes_from_value(item.get("boxes", item.get("box")))
            if err:
                return None, f"gold entity {preview(item.get('entity'), 40)}: {err}"
            out.append(Triple(str(item["entity"]), str(item["type"]), boxes))
        else:
            return None, f"gold item {preview(item, 60)} is not an entity"
    return out, None


def gold_from_column(value: Any, types: Collection[str] | None = None) -> list[Triple] | None:
    """``read_gold`` without the reason: the gold triples, or None (no gold, or gold that cannot be used)."""
    return read_gold(value, types)[0]


def make_trl_reward(config: RewardConfig | None = None, *, gold_column: str = "gold", component: str = "total",
                    name: str | None = None) -> Callable[..., list[float | None]]:
    """A TRL ``GRPOTrainer`` reward function: ``reward(prompts, completions, **columns) -> list[float | None]``; each
    value is ``gmner_reward(completion, gold, config)`` (the same number grpo_filter computes).

    ``gold_column`` names the dataset column with each row's gold (see ``read_gold``; read with ``config.types``); a
    row without gold, or with gold that cannot be read (logged, counted as ``gmner/bad_gold``), gets ``None`` (TRL
    leaves this function out for that row). ``component`` selects ``total`` or one of count/span/type/grounding/
    entailment/format (to give TRL several functions with its own ``reward_weights``). When the trainer passes
    ``log_metric``, the batch mean of every component is logged as ``gmner/<component>``, with ``gmner/unparsable``
    and ``gmner/zeroed`` (share of completions a zero rule applied to).

    >>> reward = make_trl_reward()
    >>> reward(["..."], ["<think>a person</think><answer>Obama|PER|None</answer>"], gold=["Obama|PER|None"])
    [1.0]
    """
    config = config or RewardConfig()
    if component not in ("total", *COMPONENTS):
        raise ValueError(f"component must be 'total' or one of {COMPONENTS}, got {component!r}")
    warned = [0]

    def reward(prompts: Sequence[Any] | None = None, completions: Sequence[Any] = (),
               **columns: Any) -> list[float | None]:
        if gold_column not in columns:
            raise KeyError(f"the reward needs the dataset column {gold_column!r} (gold answers); columns given: "
                           f"{sorted(k for k in columns if k not in ('trainer_state', 'log_extra', 'log_metric'))}")
        golds = columns[gold_column]
        out: list[float | None] = []
        seen: list[RewardBreakdown] = []
        bad_gold = 0
        for completion, gold_value in zip(completions, golds):
            gold, problem = read_gold(gold_value, config.types)
            if gold is None:
                if problem is not None:
                    bad_gold += 1
                    if warned[0] < 5:
                        warned[0] += 1
                        log.warning("gmner reward: row skipped (None): %s", problem)
                out.append(None)
                continue
            b = gmner_reward(completion_text(completion), gold, config)
            seen.append(b)
            out.append(float(getattr(b, component)))
        log_metric = columns.get("log_metric")
        if callable(log_metric) and component == "total":
            if seen:
                for c in COMPONENTS:
                    log_metric(f"gmner/{c}", float(np.mean([getattr(b, c) for b in seen])))
                log_metric("gmner/unparsable", float(np.mean([b.status in ("unparsable", "empty") for b in seen])))
                log_metric("gmner/zeroed", float(np.mean([b.zero_reason is not None for b in seen])))
            if bad_gold:
                log_metric("gmner/bad_gold", float(bad_gold))
        return out

    reward.__name__ = name or f"gmner_{component}"
    reward.__qualname__ = reward.__name__
    return reward
