"""Evaluation by hand-computed cases: IoU, matching, thresholds, several boxes, duplicates, bias metrics, grounding."""

from __future__ import annotations

import pytest

from gmner_pipeline.answer import Triple as T
from gmner_pipeline.scoring import EvalConfig, Sample, evaluate, iou, location_iou, matches_gold
from gmner_pipeline.scoring.boxes import passes
from gmner_pipeline.scoring.evaluate import occurs

A = (0.0, 0.0, 10.0, 10.0)          # area 100
A_HALF = (0.0, 0.0, 10.0, 20.0)     # IoU(A, A_HALF) = 100 / 200 = 0.5 exactly
A_075 = (0.0, 0.0, 10.0, 7.5)       # IoU(A, A_075) = 75 / 100 = 0.75 exactly
B = (100.0, 100.0, 150.0, 150.0)    # disjoint from A


def one(gold, pred, tokens=None, **cfg):
    return evaluate([Sample("s", gold, pred, tokens)], EvalConfig(**cfg))


def test_iou_values():
    assert iou(A, A) == 1.0
    assert iou(A, A_HALF) == 0.5
    assert iou(A, A_075) == 0.75
    assert iou(A, B) == 0.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou((10, 10, 0, 0), A) == 0.0  # inverted box: no area, no credit, no exception
    assert iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


def test_location_iou_policies_and_several_gold_boxes():
    gold = [B, A]
    assert location_iou([A_075], gold) == 0.75  # best of the gold boxes
    assert location_iou([A, (500, 500, 510, 510)], gold, "all") == 0.0
    assert location_iou([A, (500, 500, 510, 510)], gold, "any") == 1.0
    assert location_iou([(500, 500, 510, 510), A], gold, "first") == 0.0
    assert location_iou(None, gold) == 0.0 and location_iou([A], None) == 0.0


def test_iou_exactly_at_threshold():
    gold, pred = [T("Obama", "PER", (A,))], [T("Obama", "PER", (A_HALF,))]
    assert one(gold, pred).gmner.correct == 1
    assert one(gold, pred, strict_iou=True).gmner.correct == 0
    assert passes(0.5, 0.5) and not passes(0.5, 0.5, strict=True)
    r = one(gold, pred, iou_threshold=0.75)
    assert (r.gmner.correct, r.mner.correct, r.eeg.correct) == (0, 1, 0)


def test_several_gold_boxes_any_hit_is_correct():
    gold = [T("Obama", "PER", (B, A))]
    assert one(gold, [T("Obama", "PER", (A_075,))]).gmner.correct == 1
    assert one(gold, [T("Obama", "PER", (A, B))]).gmner.correct == 1  # listing both gold boxes
    two = [T("Obama", "PER", (A, (500, 500, 510, 510)))]
    assert one(gold, two).gmner.correct == 0  # "all": a wrong extra box makes it wrong
    assert one(gold, two, pred_boxes="any").gmner.correct == 1


def test_none_locations():
    gold = [T("Paris", "LOC", None)]
    assert one(gold, [T("Paris", "LOC", None)]).gmner.correct == 1
    r = one(gold, [T("Paris", "LOC", (A,))])
    assert (r.gmner.correct, r.mner.correct, r.eeg.correct) == (0, 1, 0)
    r = one([T("Paris", "LOC", (A,))], [T("Paris", "LOC", None)])
    assert (r.gmner.correct, r.eeg.correct) == (0, 0)


def test_duplicate_entity_texts_count_once_each():
    gold = [T("Obama", "PER", None), T("Obama", "PER", None)]
    r = one(gold, [T("Obama", "PER", None)] * 3)
    assert (r.gmner.correct, r.gmner.predicted, r.gmner.gold) == (2, 3, 2)
    assert r.gmner.precision == pytest.approx(2 / 3) and r.gmner.recall == 1.0 and r.gmner.f1 == pytest.approx(0.8)


def test_maximum_matching_beats_greedy():
    # pred 0 could take either gold; a greedy first-come matching gives it gold 0 and leaves pred 1 unmatched.
    gold = [T("Obama", "PER", (A,)), T("Obama", "PER", (B,))]
    pred = [T("Obama", "PER", (A, B)), T("Obama", "PER", (A_075,))]
    r = one(gold, pred, pred_boxes="any")
    assert r.gmner.correct == 2


def test_prf_and_per_type():
    gold = [T("Obama", "PER", (A,)), T("Paris", "LOC", None), T("NBA", "ORG", None)]
    pred = [T("Obama", "PER", (A_075,)), T("Paris", "ORG", None), T("Lakers", "ORG", None)]
    r = one(gold, pred)
    assert (r.gmner.correct, r.mner.correct, r.eeg.correct) == (1, 1, 2)
    assert r.gmner.precision == pytest.approx(1 / 3) and r.gmner.recall == pytest.approx(1 / 3)
    assert r.eeg.f1 == pytest.approx(2 / 3)
    per = r.to_dict()["gmner"]["per_type"]
    assert per["PER"]["f1"] == 1.0
    assert (per["ORG"]["correct"], per["ORG"]["predicted"], per["ORG"]["gold"]) == (0, 2, 1)
    assert (per["LOC"]["predicted"], per["LOC"]["gold"]) == (0, 1)


def test_empty_sides():
    r = one([], [])
    assert (r.gmner.precision, r.gmner.recall, r.gmner.f1) == (0.0, 0.0, 0.0)
    r = one([T("Paris", "LOC", None)], [])
    assert (r.gmner.predicted, r.gmner.gold, r.gmner.recall) == (0, 1, 0.0)


def test_textual_bias_metrics():
    gold = [T("A", "PER", None), T("B", "LOC", (A,)), T("C", "ORG", None)]
    pred = [T("A", "ORG", None), T("B", "LOC", None), T("D", "PER", None)]
    tb = one(gold, pred).textual_bias
    assert (tb.correct, tb.predicted, tb.gold) == (1, 3, 2)  # A: entity + None on both sides (type not required)
    assert tb.precision == pytest.approx(1 / 3) and tb.recall == 0.5 and tb.f1 == pytest.approx(0.4)
    assert one(gold, pred, n_metrics_require_type=True).textual_bias.correct == 0


def test_visual_bias_counts_entities_absent_from_the_sentence():
    tokens = "I love New York and the Lakers".split()
    pred = [T("New York", "LOC", None), T("York New", "LOC", None), T("NYC", "LOC", None), T("lakers", "ORG", None)]
    r = one([], pred, tokens)
    assert (r.n_count, r.n_count_checked) == (3, 4) and r.n_rate == 0.75
    assert one([], pred, tokens, case_sensitive=False).n_count == 2
    assert occurs("NewYork", tokens, EvalConfig(occurrence="substring"))
    assert not occurs("NYC", tokens, EvalConfig(occurrence="substring"))
    assert one([], pred, None).n_count_checked == 0  # no sentence: not checked rather than guessed


def test_grounding_accuracy_and_mean_iou():
    gold = [T("A", "PER", (A,)), T("B", "LOC", (B,)), T("C", "ORG", None), T("D", "PER", (A,))]
    pred = [T("A", "ORG", (A_075,)), T("B", "LOC", None), T("C", "ORG", None)]  # D not predicted
    r = one(gold, pred)
    assert r.groundable_gold == 3
    assert r.accuracy(0.5) == pytest.approx(1 / 3) and r.accuracy(0.75) == pytest.approx(1 / 3)
    assert r.mean_iou == pytest.approx(0.75 / 3)
    assert one(gold, pred, strict_iou=True).accuracy(0.75) == 0.0


def test_grounding_pairs_duplicates_by_best_iou():
    gold = [T("A", "PER", (A,)), T("A", "PER", (B,))]
    pred = [T("A", "PER", (B,)), T("A", "PER", (A,))]
    r = one(gold, pred)
    assert r.mean_iou == 1.0 and r.gmner.correct == 2


def test_entity_text_normalisation_options():
    gold = [T("Fox &amp ; Fin", "ORG", None)]
    assert one(gold, [T("Fox  &amp ;  Fin", "ORG", None)]).gmner.correct == 1  # whitespace runs collapse
    assert one(gold, [T("Fox &amp; Fin", "ORG", None)]).gmner.correct == 0
    assert one(gold, [T("Fox &amp; Fin", "ORG", None)], ignore_spaces=True).gmner.correct == 1
    assert one(gold, [T("fox &amp ; fin", "ORG", None)], case_sensitive=False).gmner.correct == 1


def test_ungrounded_samples_count_for_mner_only():
    s = Sample("s", [T("Paris", "LOC", None)], [T("Paris", "LOC", None)], grounded=False)
    r = evaluate([s])
    assert (r.mner.correct, r.gmner.gold, r.eeg.gold, r.textual_bias.gold, r.ungrounded_samples) == (1, 0, 0, 0, 1)


def test_every_report_states_its_rules():
    d = one([], [], strict_iou=True, iou_threshold=0.6).to_dict()
    assert "IoU > 0.6" in d["rules"]["location"] and "maximum bipartite" in d["rules"]["matching"]
    assert "ANY gold box" in d["rules"]["location"]


def test_matches_gold_uses_the_evaluation_rules():
    gold = [T("Obama", "PER", (A,)), T("Obama", "PER", (A,)), T("Paris", "LOC", None)]
    assert matches_gold([T("Paris", "LOC", None), T("Obama", "PER", (A_075,)), T("Obama", "PER", (A,))], gold)
    assert not matches_gold([T("Paris", "LOC", None), T("Obama", "PER", (A,))], gold)  # one copy missing
    assert not matches_gold(gold + [T("NBA", "ORG", None)], gold)
    assert not matches_gold([T("Paris", "LOC", None), T("Obama", "PER", (A_075,)), T("Obama", "PER", (A,))], gold,
                            EvalConfig(iou_threshold=0.8))
    assert matches_gold([], [])
