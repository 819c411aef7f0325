"""GMNER evaluation: micro P/R/F1 for GMNER, MNER and EEG, per-type breakdown, MCR's textual-bias (N-Pre/N-Rec/N-F1)
and visual-bias (N-Count/N-Rate) metrics, and grounding accuracy (Acc@IoU, mean IoU).

Rules (stated in every report's ``rules``):
  * Predictions and gold triples of a sentence are matched one-to-one by a MAXIMUM bipartite matching
    (``scipy.optimize.linear_sum_assignment`` on the 0/1 "would be correct" matrix), separately for each task; a
    sentence may repeat an entity text and each copy counts once.
  * GMNER: entity text equal, type equal, location correct. MNER: entity + type. EEG: entity + location.
  * Location correct iff both None, or IoU >= threshold (``strict_iou``: >) with ANY gold box of the entity
    (several predicted boxes: ``pred_boxes`` policy, default "all" must hit).
  * P = correct / predicted (0 when nothing is predicted), R = correct / gold (0 when there is no gold), F1 harmonic.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from ..answer import Triple
from .boxes import location_iou, passes
from .config import EvalConfig


@dataclass
class Sample:
    """One sentence to score: its gold and predicted triples and its tokens (for N-Count)."""

    id: str
    gold: list[Triple]
    pred: list[Triple]
    tokens: list[str] | None = None
    grounded: bool = True  # False: gold boxes are unknown (grounding_labels absent): scored for MNER only
    parse_status: str = "ok"


@dataclass
class PRF:
    correct: int = 0
    predicted: int = 0
    gold: int = 0

    @property
    def precision(self) -> float:
        return self.correct / self.predicted if self.predicted else 0.0

    @property
    def recall(self) -> float:
        return self.correct / self.gold if self.gold else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    def add(self, correct: int, predicted: int, gold: int) -> None:
        self.correct += correct
        self.predicted += predicted
        self.gold += gold

    def to_dict(self) -> dict[str, Any]:
        return {"precision": self.precision, "recall": self.recall, "f1": self.f1, "correct": self.correct,
                "predicted": self.predicted, "gold": self.gold}


@dataclass
class EvalReport:
    rules: dict[str, str]
    samples: int = 0
    gmner: PRF = field(default_factory=PRF)
    mner: PRF = field(default_factory=PRF)
    eeg: PRF = field(default_factory=PRF)
    gmner_per_type: dict[str, PRF] = field(default_factory=lambda: defaultdict(PRF))
    mner_per_type: dict[str, PRF] = field(default_factory=lambda: defaultdict(PRF))
    textual_bias: PRF = field(default_factory=PRF)  # N-Pre / N-Rec / N-F1
    n_count: int = 0  # predicted entities whose text does not occur in the sentence
    n_count_checked: int = 0  # predicted entities checked (sentence tokens known)
    groundable_gold: int = 0
    grounding_hits: dict[float, int] = field(default_factory=dict)
    iou_sum: float = 0.0
    ungrounded_samples: int = 0
    parse_status: Counter = field(default_factory=Counter)

    @property
    def n_rate(self) -> float:
        return self.n_count / self.n_count_checked if self.n_count_checked else 0.0

    @property
    def mean_iou(self) -> float:
        return self.iou_sum / self.groundable_gold if self.groundable_gold else 0.0

    def accuracy(self, threshold: float) -> float:
        return self.grounding_hits.get(threshold, 0) / self.groundable_gold if self.groundable_gold else 0.0

    def to_dict(self) -> dict[str, Any]:
        tb = self.textual_bias
        gmner_types = {t: v.to_dict() for t, v in sorted(self.gmner_per_type.items())}
        mner_types = {t: v.to_dict() for t, v in sorted(self.mner_per_type.items())}
        return {
            "rules": dict(self.rules),
            "samples": self.samples,
            "gmner": self.gmner.to_dict() | {"per_type": gmner_types},
            "mner": self.mner.to_dict() | {"per_type": mner_types},
            "eeg": self.eeg.to_dict(),
            "textual_bias": {"n_pre": tb.precision, "n_rec": tb.recall, "n_f1": tb.f1, "n_correct": tb.correct,
                             "n_predicted": tb.predicted, "n_gold": tb.gold},
            "visual_bias": {"n_count": self.n_count, "n_rate": self.n_rate, "checked": self.n_count_checked},
            "grounding": {"groundable_gold": self.groundable_gold, "mean_iou": self.mean_iou,
                          **{f"acc@{t:g}": self.accuracy(t) for t in sorted(self.grounding_hits)}},
            "ungrounded_samples": self.ungrounded_samples,
            "parse_status": dict(sorted(self.parse_status.items())),
        }


def describe_rules(config: EvalConfig) -> dict[str, str]:
    op = ">" if config.strict_iou else ">="
    text = ("exact text" if config.case_sensitive else "case-insensitive text") + (
        ", all whitespace ignored" if config.ignore_spaces else ", whitespace runs collapsed")
    return {
        "matching": "one-to-one maximum bipartite matching per sentence (scipy linear_sum_assignment), per task",
        "location": f"correct iff both None, or IoU {op} {config.iou_threshold:g} with ANY gold box of the entity",
        "pred_boxes": {"all": "several predicted boxes: every one must pass against some gold box",
                       "any": "several predicted boxes: one passing box suffices",
                       "first": "several predicted boxes: only the first is scored"}[config.pred_boxes],
        "entity": text,
        "gmner": "entity + type + location", "mner": "entity + type", "eeg": "entity + location",
        "textual_bias": "N-Pre/N-Rec/N-F1 over triples whose location is None: entity "
                        + ("+ type " if config.n_metrics_require_type else "") + "equal and both None (MCR eq. 26-29)",
        "visual_bias": "N-Count: predicted entities not occurring in the sentence ("
                       + ("contiguous token run" if config.occurrence == "tokens" else "spaceless substring")
                       + "); N-Rate = N-Count / predicted",
        "grounding": "over gold entities with >= 1 box: each is paired with a prediction of the same entity text "
                     "(maximum matching, best IoU), IoU 0 when unpaired or predicted None; Acc@t = share with "
                     f"IoU {op} t, mean IoU = average",
    }


def evaluate(samples: Iterable[Sample], config: EvalConfig | None = None) -> EvalReport:
    config = config or EvalConfig()
    report = EvalReport(rules=describe_rules(config), grounding_hits={t: 0 for t in config.grounding_thresholds})
    norm = entity_normalizer(config)
    for s in samples:
        score_sample(s, config, norm, report)
    return report


def entity_normalizer(config: EvalConfig) -> Callable[[str], str]:
    def norm(text: str) -> str:
        text = "".join(text.split()) if config.ignore_spaces else " ".join(text.split())
        return text if config.case_sensitive else text.casefold()

    return norm


def max_matching(ok: np.ndarray) -> list[tuple[int, int]]:
    """Pairs (i, j) of a maximum one-to-one matching on the boolean matrix ``ok`` (only True cells are pairs)."""
    if ok.size == 0 or not ok.any():
        return []
    rows, cols = linear_sum_assignment(ok.astype(np.float64), maximize=True)
    return [(int(i), int(j)) for i, j in zip(rows, cols) if ok[i, j]]


def score_sample(s: Sample, config: EvalConfig, norm: Callable[[str], str], report: EvalReport) -> None:
    report.samples += 1
    report.parse_status[s.parse_status] += 1
    pred, gold = s.pred, s.gold
    p_ent = [norm(t.entity) for t in pred]
    g_ent = [norm(t.entity) for t in gold]
    same_entity = np.array([[pe == ge for ge in g_ent] for pe in p_ent], dtype=bool).reshape(len(pred), len(gold))
    same_type = np.array([[pt.type == gt.type for gt in gold] for pt in pred], dtype=bool).reshape(len(pred), len(gold))

    mner_pairs = max_matching(same_entity & same_type)
    report.mner.add(len(mner_pairs), len(pred), len(gold))
    _per_type(report.mner_per_type, pred, gold, mner_pairs)

    for t in pred:
        if s.tokens:
            report.n_count_checked += 1
            report.n_count += not occurs(t.entity, s.tokens, config)

    if not s.grounded:
        report.ungrounded_samples += 1
        return

    ious = np.array([[location_iou(pt.boxes, gt.boxes, config.pred_boxes) for gt in gold] for pt in pred],
                    dtype=np.float64).reshape(len(pred), len(gold))
    loc_ok = np.array([[_location_correct(pt, gt, ious[i, j], config) for j, gt in enumerate(gold)]
                       for i, pt in enumerate(pred)], dtype=bool).reshape(len(pred), len(gold))

    gmner_pairs = max_matching(same_entity & same_type & loc_ok)
    report.gmner.add(len(gmner_pairs), len(pred), len(gold))
    _per_type(report.gmner_per_type, pred, gold, gmner_pairs)
    report.eeg.add(len(max_matching(same_entity & loc_ok)), len(pred), len(gold))

    p_none = np.array([t.boxes is None for t in pred], dtype=bool)
    g_none = np.array([t.boxes is None for t in gold], dtype=bool)
    n_ok = same_entity & np.outer(p_none, g_none)
    if config.n_metrics_require_type:
        n_ok &= same_type
    report.textual_bias.add(len(max_matching(n_ok)), int(p_none.sum()), int(g_none.sum()))

    _grounding(report, config, same_entity, ious, gold)


def _location_correct(pt: Triple, gt: Triple, iou_value: float, config: EvalConfig) -> bool:
    if pt.boxes is None or gt.boxes is None:
        return pt.boxes is None and gt.boxes is None
    return passes(iou_value, config.iou_threshold, config.strict_iou)


def _per_type(table: dict[str, PRF], pred: Sequence[Triple], gold: Sequence[Triple],
              pairs: list[tuple[int, int]]) -> None:
    for t in pred:
        table[t.type].predicted += 1
    for t in gold:
        table[t.type].gold += 1
    for _, j in pairs:
        table[gold[j].type].correct += 1


def _grounding(report: EvalReport, config: EvalConfig, same_entity: np.ndarray, ious: np.ndarray,
               gold: Sequence[Triple]) -> None:
    groundable = [j for j, g in enumerate(gold) if g.boxes is not None]
    if not groundable:
        return
    best = np.zeros(len(gold))
    if same_entity.any():
        # Maximise the number of entity pairs first, then their IoU: the big constant dominates any IoU sum.
        big = float(len(gold) + 1)
        weights = np.where(same_entity, big + ious, 0.0)
        rows, cols = linear_sum_assignment(weights, maximize=True)
        for i, j in zip(rows, cols):
            if same_entity[i, j]:
                best[j] = ious[i, j]
    for j in groundable:
        report.groundable_gold += 1
        report.iou_sum += best[j]
        for t in report.grounding_hits:
            report.grounding_hits[t] += passes(best[j], t, config.strict_iou)


def occurs(entity: str, tokens: Sequence[str], config: EvalConfig) -> bool:
    """Whether an entity text occurs in the sentence (for N-Count), under ``config.occurrence``."""
    fold = (lambda x: x) if config.case_sensitive else str.casefold
    if config.occurrence == "substring":
        return fold("".join(entity.split())) in fold("".join(tokens))
    needle = [fold(t) for t in entity.split()]
    hay = [fold(t) for t in tokens]
    if not needle:
        return False
    n = len(needle)
    return any(hay[i:i + n] == needle for i in range(len(hay) - n + 1))



def matches_gold(pred: Sequence[Triple], gold: Sequence[Triple], config: EvalConfig | None = None) -> bool:
    """True iff the prediction is fully correct under the evaluation rules: every gold triple is matched by a
    correct prediction and nothing else is predicted (for keeping only consistent CoT chains; ``same_triples`` is the
    stricter integer-pixel identity)."""
    config = config or EvalConfig()
    if len(pred) != len(gold):
        return False
    report = EvalReport(rules={})
    score_sample(Sample("", list(gold), list(pred)), config, entity_normalizer(config), report)
    return report.gmner.correct == len(gold)
