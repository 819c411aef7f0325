"""Typed settings for evaluation, rewards and the GRPO filter. Defaults follow method-spec §Stage 5 and §Evaluation;
the items marked "project decision" there are fields here so that a run can change them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from ..answer import DEFAULT_TYPES, MAX_ANSWER_CHARS
from ..configbase import Frozen


class EvalConfig(Frozen):
    """How predicted triples are matched to gold triples."""

    iou_threshold: float = Field(0.5, ge=0.0, le=1.0, description="a box is correct at IoU >= this with any gold box")
    strict_iou: bool = Field(False, description="use IoU > threshold (H-Index) instead of >= (E2E-GMNER, RiVEG)")
    pred_boxes: Literal["all", "any", "first"] = Field(
        "all", description="when a prediction lists several boxes: all must hit a gold box (default), any, or first")
    case_sensitive: bool = Field(True, description="compare entity texts case-sensitively")
    ignore_spaces: bool = Field(False, description="compare entity texts with all whitespace removed "
                                "('Fox &amp; Fin' == 'Fox &amp ; Fin'); off: whitespace runs are collapsed only")
    n_metrics_require_type: bool = Field(False, description="N-Pre/N-Rec also require the type (MCR: entity + None)")
    occurrence: Literal["tokens", "substring"] = Field(
        "tokens", description="N-Count: an entity occurs in the sentence when its tokens are a contiguous run of the "
        "sentence tokens ('tokens') or its text, spaces removed, is a substring of the spaceless sentence")
    grounding_thresholds: tuple[float, ...] = Field((0.5, 0.75), description="Acc@t reported for these IoU values")
    types: tuple[str, ...] = Field(DEFAULT_TYPES, description="the label set answers are read with (the rewards' "
                                   "default too); gmner-pipeline eval adds any other type the gold has")


class RewardConfig(Frozen):
    """MCR's verifiable rewards (App. D) plus the guards that keep a policy from collecting reward without doing the
    task. The defaults are the safe choices that grpo_filter and the GRPO trainer get by using ``RewardConfig()``;
    ``RewardConfig.mcr()`` gives MCR's rewards as published (no format gate, partial answers scored, means over the
    matched pairs). The lambdas and sigma are not given in the paper (project decision). docs/scoring.md explains
    every field."""

    weights: dict[Literal["count", "span", "type", "grounding", "entailment", "format"], float] = Field(
        default_factory=lambda: {"count": 0.2, "span": 0.2, "type": 0.2, "grounding": 0.2, "entailment": 0.2},
        description="lambda_1..5 for R_c, R_s, R_t, R_u, R_e; a 'format' weight adds the format component to the "
        "weighted sum (default: none, the format acts as a gate through require_format)")
    normalize_weights: bool = Field(True, description="divide the total by the sum of the weights so it lies in [0, 1] "
                                    "(the GRPO filter thresholds assume that scale)")
    sigma: float = Field(0.5, ge=0.0, lt=1.0, description="R_u: IoU below sigma counts 0, above is mapped to [0, 1]")
    over_weights: tuple[tuple[int, float], ...] = Field(
        ((1, 0.4), (3, 0.2), (5, 0.1)), description="w_o(q): (q_min, weight) brackets, for p > q > 0")
    under_weights: tuple[tuple[int, float], ...] = Field(
        ((0, 0.5), (3, 0.3), (5, 0.2)), description="w_u(p): (p_min, weight) brackets, for 0 < p < q")
    pred_boxes: Literal["all", "any", "first"] = Field("all", description="see EvalConfig.pred_boxes")
    both_none_grounding: float = Field(1.0, ge=0.0, le=1.0,
                                       description="R_u of a matched pair where both locations are None")
    drop_zero_overlap_pairs: bool = Field(
        False, description="Hungarian pairs sharing no token are not matched (default: every assigned pair counts, "
        "so k = min(p, q) as in MCR eq. 18)")
    case_sensitive: bool = Field(True, description="compare entity tokens case-sensitively (R_s) and types (R_t)")
    # --- guards against reward hacking (docs/scoring.md, "Rewards that cannot be gamed") ---
    require_format: bool = Field(
        True, description="a completion that is not exactly <think>non-empty</think><answer>...</answer> (tags closed, "
        "in order, once each, only whitespace outside them) scores 0; false: MCR-style, the format is only reported")
    partial_is_unparsable: bool = Field(
        True, description="an answer with a record the parser could not read (a malformed or omitted location, text "
        "after the last record) scores 0 like an unparsable one, so a broken record never beats a wrong one")
    skipped_text_is_unparsable: bool = Field(
        True, description="an answer with prose the parser read past (a line before or after the records, text "
        "around a code fence or a JSON list) scores 0; false: the prose is ignored as in evaluation")
    pair_mean: Literal["max_pq", "matched"] = Field(
        "max_pq", description="R_s, R_t, R_u, R_e are means over max(p, q), so every spurious or missing entity "
        "counts 0 ('max_pq'), or over the k matched pairs only ('matched', MCR eq. 18: gold + 20 spurious "
        "entities still scores 0.8)")
    types: tuple[str, ...] = Field(
        DEFAULT_TYPES, description="the label set the completion and a gold answer string are read with (types "
        "matched case-insensitively, swapped entity/type fields put right): the same default as "
        "gmner-pipeline eval and the student prompt")
    lookalike_bars: bool = Field(True, description="read the bars '│', '丨', '∣' as '|' (as E2E-GMNER's parser does)")
    max_answer_chars: int | None = Field(
        MAX_ANSWER_CHARS, ge=1, description="an answer longer than this is unparsable (scores 0) and is not read: "
        "parsing time stays bounded on degenerate completions; None: no limit")

    @model_validator(mode="after")
    def _check(self) -> "RewardConfig":
        if any(w < 0 for w in self.weights.values()) or sum(self.weights.values()) <= 0:
            raise ValueError("reward weights must be >= 0 with a positive sum")
        for name in ("over_weights", "under_weights"):
            brackets = getattr(self, name)
            lows = [lo for lo, _ in brackets]
            if not brackets or lows != sorted(lows) or len(set(lows)) != len(lows):
                raise ValueError(f"{name} must be (min_count, weight) pairs with increasing min_count")
        if not self.types:
            raise ValueError("types (the label set) must not be empty")
        return self

    @classmethod
    def mcr(cls, **overrides: Any) -> "RewardConfig":
        """MCR's rewards as published (App. D): no format gate, partial answers and skipped prose scored on what was
        read, component means over the matched pairs. For comparisons with the paper, not for training."""
        settings: dict[str, Any] = dict(require_format=False, partial_is_unparsable=False,
                                        skipped_text_is_unparsable=False, pair_mean="matched")
        return cls(**(settings | overrides))


class GrpoFilterConfig(Frozen):
    """MCR App. D.3: keep an item iff std >= min_std, max >= min_max and median_low <= median <= median_high."""

    min_std: float = 0.1
    min_max: float = 0.8
    median_low: float = 0.08
    median_high: float = 0.6
    std: Literal["population", "sample"] = Field("population", description="population (ddof 0) is the project "
                                                 "decision; sample uses ddof 1")
    min_group: int = Field(2, ge=1, description="fewer valid rewards than this: dropped as 'too_few_rewards'")
    histogram_bins: int = Field(20, ge=2)

    @model_validator(mode="after")
    def _check(self) -> "GrpoFilterConfig":
        if self.median_low > self.median_high:
            raise ValueError(f"median_low {self.median_low} > median_high {self.median_high}: no item could be kept")
        return self
