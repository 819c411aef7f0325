"""MCR's verifiable rewards (MCR §4.2.1, App. D.1-D.2; method-spec §Stage 5).

For a response with p predicted triples and a sample with q gold triples:

* R_c (count): 1 if p = q; max(0, 1 - (p - q) w_o(q)) if p > q > 0; max(0, 1 - (q - p) w_u(p)) if 0 < p < q; else 0.
* Pairs: token F1 of every predicted/gold span pair, F = 2w / (n + m) with w the longest CONTIGUOUS common token run,
  matched one-to-one by the Hungarian algorithm (maximum total F; k = min(p, q) pairs). Among matchings with the same
  total F, the one agreeing best on type/visibility/box is taken (so duplicate entity texts do not score by luck).
* R_s = mean F, R_t = share of pairs with equal types, R_u = mean max(0, (IoU - sigma) / (1 - sigma)) with IoU the best
  over the gold boxes (both None: ``both_none_grounding``, one None: 0), R_e = share of pairs agreeing on visible/None.
* R = sum(lambda_i R_i), divided by sum(lambda) when ``normalize_weights`` (default) so that R lies in [0, 1].

Edge cases (project decision): an unparsable or empty response scores 0 on every component; k = 0 gives
R_s = R_t = R_u = R_e = 0; p = q = 0 gives 1 on every component.

``make_trl_reward`` wraps this as a TRL reward function ``(prompts, completions, **columns) -> list[float | None]``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Collection, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from ..answer import ParsedAnswer, Triple, boxes_from_value, gold_triples, parse_answer
from .boxes import location_iou
from .config import RewardConfig

COMPONENTS = ("count", "span", "type", "grounding", "entailment")
_TIE_BREAK = 1e-6  # < any difference between two distinct sums of span F1 values of realistic entity lengths


@dataclass(frozen=True)
class RewardBreakdown:
    count: float
    span: float
    type: float
    grounding: float
    entailment: float
    total: float
    p: int
    q: int
    k: int
    status: str  # the parse status of the response

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
    """Every reward component for predicted triples (or a parsed answer) against gold triples."""
    config = config or RewardConfig()
    status = "ok"
    if isinstance(pred, ParsedAnswer):
        status = pred.status
        if status in ("unparsable", "empty") or (status == "partial" and config.partial_is_unparsable):
            return _zero(len(pred.triples), len(gold), status)
        pred = pred.triples
    pred, gold = list(pred), list(gold)
    p, q = len(pred), len(gold)
    if p == 0 and q == 0:
        return RewardBreakdown(1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0, 0, 0, status)
    r_c = count_reward(p, q, config)
    pairs, f = _match(pred, gold, config)
    k = len(pairs)
    if k == 0:
        return _combine(config, r_c, 0.0, 0.0, 0.0, 0.0, p, q, 0, status)
    fold = (lambda s: s) if config.case_sensitive else str.casefold
    r_s = float(sum(f[i, j] for i, j in pairs)) / k
    r_t = sum(fold(pred[i].type) == fold(gold[j].type) for i, j in pairs) / k
    r_u = sum(grounding_score(pred[i], gold[j], config) for i, j in pairs) / k
    r_e = sum((pred[i].boxes is None) == (gold[j].boxes is None) for i, j in pairs) / k
    return _combine(config, r_c, r_s, r_t, r_u, r_e, p, q, k, status)


def _match(pred: list[Triple], gold: list[Triple], config: RewardConfig) -> tuple[list[tuple[int, int]], np.ndarray]:
    if not pred or not gold:
        return [], np.zeros((len(pred), len(gold)))
    fold = (lambda s: s) if config.case_sensitive else str.casefold
    p_tok = [fold(t.entity).split() for t in pred]
    g_tok = [fold(t.entity).split() for t in gold]
    f = np.array([[span_f1(a, b) for b in g_tok] for a in p_tok], dtype=np.float64)
    agree = np.array([[(fold(a.type) == fold(b.type)) + ((a.boxes is None) == (b.boxes is None))
                       + grounding_score(a, b, config) for b in gold] for a in pred], dtype=np.float64) / 3.0
    eps = _TIE_BREAK / (min(len(pred), len(gold)) + 1)
    rows, cols = linear_sum_assignment(f + eps * agree, maximize=True)
    pairs = [(int(i), int(j)) for i, j in zip(rows, cols)]
    if config.drop_zero_overlap_pairs:
        pairs = [(i, j) for i, j in pairs if f[i, j] > 0]
    return pairs, f


def _combine(config: RewardConfig, r_c: float, r_s: float, r_t: float, r_u: float, r_e: float, p: int, q: int,
             k: int, status: str) -> RewardBreakdown:
    w = config.weights
    values = {"count": r_c, "span": r_s, "type": r_t, "grounding": r_u, "entailment": r_e}
    total = sum(w.get(name, 0.0) * v for name, v in values.items())
    if config.normalize_weights:
        total /= sum(w.values())
    return RewardBreakdown(float(r_c), float(r_s), float(r_t), float(r_u), float(r_e), float(total), p, q, k, status)


def _zero(p: int, q: int, status: str) -> RewardBreakdown:
    return RewardBreakdown(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, p, q, 0, status)


def gmner_reward(completion: str | None, gold: Sequence[Triple], config: RewardConfig | None = None,
                 types: Collection[str] | None = None) -> RewardBreakdown:
    """Parse a completion and score it against gold triples."""
    config = config or RewardConfig()
    text = completion or ""
    if config.require_answer_tags and "<answer>" not in text.lower():
        return _zero(0, len(gold), "unparsable")
    return reward_components(parse_answer(completion, types=types), gold, config)


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


def gold_from_column(value: Any, types: Collection[str] | None = None) -> list[Triple] | None:
    """Gold triples from a dataset column: an E2E-GMNER answer string, record entities (``text``/``type``/``boxes``
    dicts), ``{"entity","type","boxes"}`` dicts, or Triples. None (or an unparsable gold) -> None: not applicable."""
    if value is None:
        return None
    if isinstance(value, str):
        parsed = parse_answer(value, types=types)
        return parsed.triples if parsed.status == "ok" else None
    if isinstance(value, dict) and "entities" in value:
        value = value["entities"]
    if isinstance(value, (list, tuple)):
        out: list[Triple] = []
        for item in value:
            if isinstance(item, Triple):
                out.append(item)
            elif isinstance(item, dict) and "text" in item and "type" in item:
                out.extend(gold_triples({"entities": [item]}))
            elif isinstance(item, dict) and "entity" in item and "type" in item:
                boxes, err = boxes_from_value(item.get("boxes", item.get("box")))
                if err:
                    return None
                out.append(Triple(str(item["entity"]), str(item["type"]), boxes))
            else:
                return None
        return out
    return None


def make_trl_reward(config: RewardConfig | None = None, *, gold_column: str = "gold", component: str = "total",
                    types: Collection[str] | None = None, name: str | None = None) -> Callable[..., list[float | None]]:
    """A TRL ``GRPOTrainer`` reward function: ``reward(prompts, completions, **columns) -> list[float | None]``.

    ``gold_column`` names the dataset column with each row's gold (see ``gold_from_column``); a row whose gold is
    missing gets ``None`` (TRL leaves this function out for that row). ``component`` selects ``total`` or one of
    count/span/type/grounding/entailment (to give TRL several functions with its own ``reward_weights``). When the
    trainer passes ``log_metric``, the batch mean of every component is logged as ``gmner/<component>``.
    """
    config = config or RewardConfig()
    if component not in ("total", *COMPONENTS):
        raise ValueError(f"component must be 'total' or one of {COMPONENTS}, got {component!r}")

    def reward(prompts: Sequence[Any] | None = None, completions: Sequence[Any] = (),
               **columns: Any) -> list[float | None]:
        if gold_column not in columns:
            raise KeyError(f"the reward needs the dataset column {gold_column!r} (gold answers); columns given: "
                           f"{sorted(k for k in columns if k not in ('trainer_state', 'log_extra', 'log_metric'))}")
        golds = columns[gold_column]
        out: list[float | None] = []
        seen: list[RewardBreakdown] = []
        for completion, gold_value in zip(completions, golds):
            gold = gold_from_column(gold_value, types)
            if gold is None:
                out.append(None)
                continue
            b = gmner_reward(completion_text(completion), gold, config, types)
            seen.append(b)
            out.append(float(getattr(b, component)))
        log_metric = columns.get("log_metric")
        if callable(log_metric) and seen and component == "total":
            for c in COMPONENTS:
                log_metric(f"gmner/{c}", float(np.mean([getattr(b, c) for b in seen])))
            log_metric("gmner/unparsable", float(np.mean([b.status in ("unparsable", "empty") for b in seen])))
        return out

    reward.__name__ = name or f"gmner_{component}"
    reward.__qualname__ = reward.__name__
    return reward
