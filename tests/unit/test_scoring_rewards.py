"""MCR rewards by hand-computed cases: every R_c bracket, p = 0 / q = 0 / p = q = 0, span F1 from the longest contiguous
run, Hungarian matching, sigma mapping, several gold boxes, duplicates, edge cases, and the TRL adapter."""

from __future__ import annotations

import pytest

from gmner_pipeline.answer import ParsedAnswer
from gmner_pipeline.answer import Triple as T
from gmner_pipeline.scoring import RewardConfig, gmner_reward, make_trl_reward, reward_components
from gmner_pipeline.scoring.rewards import count_reward, longest_common_run, span_f1

A = (0.0, 0.0, 10.0, 10.0)
A_075 = (0.0, 0.0, 10.0, 7.5)  # IoU 0.75 with A
A_HALF = (0.0, 0.0, 10.0, 20.0)  # IoU 0.5 with A
B = (100.0, 100.0, 150.0, 150.0)


@pytest.mark.parametrize("p,q,expected", [
    (0, 0, 1.0), (1, 1, 1.0), (7, 7, 1.0),                       # p = q
    (0, 3, 0.0), (3, 0, 0.0),                                     # p = 0 < q, p > q = 0: "otherwise"
    (2, 1, 0.6), (3, 1, 0.2), (4, 1, 0.0), (3, 2, 0.6), (5, 2, 0.0),  # w_o = 0.4 for q in {1, 2}
    (4, 3, 0.8), (6, 3, 0.4), (5, 4, 0.8), (9, 4, 0.0),           # w_o = 0.2 for q in {3, 4}
    (6, 5, 0.9), (8, 5, 0.7), (15, 5, 0.0), (12, 10, 0.8),        # w_o = 0.1 for q >= 5
    (1, 2, 0.5), (1, 3, 0.0), (2, 3, 0.5), (2, 4, 0.0),           # w_u = 0.5 for p in {1, 2}
    (3, 4, 0.7), (3, 5, 0.4), (4, 6, 0.4), (4, 8, 0.0),           # w_u = 0.3 for p in {3, 4}
    (5, 6, 0.8), (5, 9, 0.2), (6, 10, 0.2), (5, 10, 0.0),         # w_u = 0.2 for p >= 5
])
def test_count_reward_brackets(p, q, expected):
    assert count_reward(p, q) == pytest.approx(expected, abs=1e-12)


def test_count_reward_brackets_are_config():
    cfg = RewardConfig(over_weights=((1, 0.5),), under_weights=((0, 0.25),))
    assert count_reward(3, 2, cfg) == 0.5 and count_reward(2, 6, cfg) == 0.0 and count_reward(3, 4, cfg) == 0.75


def test_span_f1_uses_the_longest_contiguous_run():
    assert longest_common_run("New York City".split(), "New City".split()) == 1
    assert span_f1("New York City".split(), "New City".split()) == pytest.approx(2 * 1 / (3 + 2))  # not bag-of-words
    assert span_f1("Barack Obama".split(), "Obama".split()) == pytest.approx(2 / 3)
    assert span_f1("the Los Angeles Lakers".split(), "Los Angeles Lakers".split()) == pytest.approx(6 / 7)
    assert span_f1("Obama".split(), "Paris".split()) == 0.0
    assert span_f1([], ["x"]) == 0.0


def test_hungarian_matching_maximises_total_span_f1():
    # F: P0-G0 = 2/3, P0-G1 = 4/5, P1-G0 = 1, P1-G1 = 1/2 -> optimum P0-G1 + P1-G0 = 1.8
    pred = [T("x y", "PER", None), T("y", "LOC", None)]
    gold = [T("y", "LOC", None), T("x y z", "PER", None)]
    r = reward_components(pred, gold)
    assert r.k == 2 and r.span == pytest.approx(0.9) and r.type == 1.0 and r.entailment == 1.0


def test_grounding_sigma_mapping_and_several_gold_boxes():
    gold = [T("Obama", "PER", (B, A))]  # several gold boxes: the best IoU counts
    assert reward_components([T("Obama", "PER", (A_075,))], gold).grounding == pytest.approx(0.5)   # (0.75-.5)/.5
    assert reward_components([T("Obama", "PER", (A,))], gold).grounding == 1.0
    assert reward_components([T("Obama", "PER", (A_HALF,))], gold).grounding == 0.0  # IoU = sigma
    assert reward_components([T("Obama", "PER", ((0, 0, 10, 4),))], gold).grounding == 0.0  # IoU 0.4 < sigma
    assert reward_components([T("Obama", "PER", (A_075,))], gold, RewardConfig(sigma=0.0)).grounding == 0.75
    assert reward_components([T("Obama", "PER", None)], gold).grounding == 0.0
    none = [T("Paris", "LOC", None)]
    assert reward_components(none, none).grounding == 1.0
    assert reward_components(none, none, RewardConfig(both_none_grounding=0.0)).grounding == 0.0


def test_type_and_entailment_rewards():
    gold = [T("Obama", "PER", (A,)), T("Paris", "LOC", None), T("NBA", "ORG", None), T("Bulls", "ORG", (B,))]
    pred = [T("Obama", "ORG", (A,)), T("Paris", "LOC", (A,)), T("NBA", "ORG", None), T("Bulls", "ORG", (B,))]
    r = reward_components(pred, gold)
    assert (r.p, r.q, r.k) == (4, 4, 4)
    assert r.count == 1.0 and r.span == 1.0
    assert r.type == 0.75 and r.entailment == 0.75
    assert r.grounding == pytest.approx((1 + 0 + 1 + 1) / 4)
    assert r.total == pytest.approx((1 + 1 + 0.75 + 0.75 + 0.75) / 5)


def test_weighted_total():
    gold = [T("Obama", "PER", None)]
    pred = [T("Obama", "LOC", None), T("Paris", "LOC", None)]  # MCR: R_c 0.6, R_s 1, R_t 0, R_u 1, R_e 1
    weights = {"count": 2, "type": 1, "span": 1, "grounding": 0, "entailment": 0}
    r = reward_components(pred, gold, RewardConfig.mcr(weights=weights))
    assert (r.count, r.span, r.type) == (pytest.approx(0.6), 1.0, 0.0)
    assert r.total == pytest.approx((2 * 0.6 + 1) / 4)
    raw = reward_components(pred, gold, RewardConfig.mcr(weights=weights, normalize_weights=False))
    assert raw.total == pytest.approx(2 * 0.6 + 1)
    # the default means over max(p, q) = 2: the spurious Paris counts 0 in R_s
    r = reward_components(pred, gold, RewardConfig(weights=weights))
    assert (r.count, r.span, r.type) == (pytest.approx(0.6), 0.5, 0.0)
    assert r.total == pytest.approx((2 * 0.6 + 0.5) / 4)
    # a format weight adds the format component to the weighted sum
    both = RewardConfig(weights=weights | {"format": 1}, require_format=False)
    assert gmner_reward("Obama|LOC|None; Paris|LOC|None", gold, both).total == pytest.approx((2 * 0.6 + 0.5) / 5)
    assert gmner_reward("<think>x</think><answer>Obama|LOC|None; Paris|LOC|None</answer>", gold,
                        both).total == pytest.approx((2 * 0.6 + 0.5 + 1) / 5)


def test_edge_cases():
    gold = [T("Obama", "PER", None)]
    assert reward_components([], []).as_dict() == {
        "count": 1.0, "span": 1.0, "type": 1.0, "grounding": 1.0, "entailment": 1.0, "format": 1.0, "total": 1.0,
        "p": 0, "q": 0, "k": 0, "status": "ok", "zero_reason": None}
    r = reward_components([], gold)  # p = 0 < q: R_c = 0 and k = 0
    assert (r.count, r.span, r.type, r.grounding, r.entailment, r.total, r.k) == (0, 0, 0, 0, 0, 0, 0)
    r = reward_components(gold, [])  # p > q = 0
    assert (r.count, r.total, r.k) == (0, 0, 0)
    for status in ("unparsable", "empty"):
        assert reward_components(ParsedAnswer(gold, status), gold).total == 0.0
    partial = ParsedAnswer(gold, "partial", ["x"])
    assert reward_components(partial, gold, RewardConfig(partial_is_unparsable=False)).total == 1.0
    assert reward_components(partial, gold).total == 0.0
    assert reward_components(partial, gold).zero_reason == "partial"
    assert gmner_reward("complete nonsense", gold).total == 0.0
    assert gmner_reward("<think>x</think><answer>None</answer>", []).total == 1.0
    assert gmner_reward("<think>x</think><answer>Obama|PER|None</answer>", gold).total == 1.0
    assert gmner_reward("None", [], RewardConfig.mcr()).total == 1.0
    assert gmner_reward("<answer>Obama|PER|None</answer>", gold, RewardConfig.mcr()).total == 1.0
    untagged = gmner_reward("Obama|PER|None", gold)
    assert (untagged.total, untagged.format, untagged.zero_reason) == (0.0, 0.0, "format: no <think> tag")


def test_zero_overlap_pairs_option():
    gold = [T("Obama", "PER", None)]
    pred = [T("Paris", "PER", None)]
    r = reward_components(pred, gold)  # MCR eq. 18: the assigned pair counts, F = 0
    assert (r.k, r.span, r.type, r.entailment) == (1, 0.0, 1.0, 1.0)
    r = reward_components(pred, gold, RewardConfig(drop_zero_overlap_pairs=True))
    assert (r.k, r.count, r.span, r.type, r.entailment) == (0, 1.0, 0.0, 0.0, 0.0)


def test_duplicate_entity_texts_are_paired_by_their_boxes():
    gold = [T("Obama", "PER", (A,)), T("Obama", "PER", (B,))]
    pred = [T("Obama", "PER", (B,)), T("Obama", "PER", (A,))]  # same F everywhere: the tie-break uses the boxes
    assert reward_components(pred, gold).total == 1.0


def test_config_is_checked():
    with pytest.raises(ValueError):
        RewardConfig(weights={"count": -1})
    with pytest.raises(ValueError):
        RewardConfig(over_weights=((3, 0.2), (1, 0.4)))
    with pytest.raises(ValueError):
        RewardConfig(sigma=1.0)
    with pytest.raises(ValueError):
        RewardConfig(unknown=1)


def test_trl_adapter_signature_and_formats():
    reward = make_trl_reward()
    assert reward.__name__ == "gmner_total"
    logged = {}
    completions = [
        "<think>t</think><answer>Obama|PER|None</answer>",                      # standard format
        [{"role": "assistant", "content": "<think>t</think><answer>Obama|PER|None</answer>"}],  # conversational
        [{"role": "assistant", "content": [{"type": "text", "text": "<think>t</think><answer>None</answer>"}]}],
        "garbage",
        "Obama|PER|None",
    ]
    gold = ["Obama|PER|None",
            [{"text": "Obama", "type": "PER", "boxes": []}],                  # record entities
            [],                                                              # no entity
            [{"entity": "Obama", "type": "PER", "boxes": None}],
            None]                                                            # no gold: not applicable
    out = reward(prompts=["p"] * 5, completions=completions, gold=gold, trainer_state=object(),
                 log_metric=lambda k, v: logged.__setitem__(k, v), log_extra=lambda *a: None, completion_ids=[])
    assert out == [1.0, 1.0, 1.0, 0.0, None]
    assert logged["gmner/unparsable"] == pytest.approx(0.25) and logged["gmner/count"] == pytest.approx(0.75)
    assert logged["gmner/format"] == pytest.approx(0.75) and logged["gmner/zeroed"] == pytest.approx(0.25)
    span = make_trl_reward(component="span", gold_column="solution")
    assert span.__name__ == "gmner_span"
    assert span(["p"], ["<think>t</think><answer>Barack Obama|PER|None</answer>"],
                solution=["Obama|PER|None"]) == [pytest.approx(2 / 3)]
    fmt = make_trl_reward(component="format")
    assert fmt(["p"] * 2, ["<think>t</think><answer>x</answer>", "<answer>x</answer>"], gold=["None"] * 2) == [1, 0]
    with pytest.raises(KeyError, match="gold"):
        reward(["p"], ["x"])
    with pytest.raises(ValueError):
        make_trl_reward(component="nope")
