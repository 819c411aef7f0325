"""Outside data never crashes scoring (issue #10): every number read from a predictions file, a completion or a gold
column is guarded (a 400-digit integer, 1e999, NaN, nesting too deep); the eval reader and the TRL adapter are fuzzed
with hypothesis. And the two reward entry points give identical numbers for the same completion."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from gmner_pipeline.answer import Triple, boxes_from_value, format_answer, format_turn, gold_triples, parse_answer
from gmner_pipeline.frames import FrameConfig, text_from_frame
from gmner_pipeline.scoring import (COMPONENTS, EvalConfig, RewardConfig, evaluate, gmner_reward, make_trl_reward,
                                    read_gold)
from gmner_pipeline.scoring.boxes import iou
from gmner_pipeline.scoring.io import load_predictions, pair

HUGE = int("9" * 400)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- the 400-digit integer --------------------------------------------------------------------------------------------

def test_eval_reports_and_skips_a_400_digit_coordinate(tmp_path):
    from test_scoring_cli import app, write_dataset

    gold = write_dataset(tmp_path / "data")
    lines = [json.dumps({"id": "1", "triples": [{"entity": "Alice Smith", "type": "PER", "boxes": [[HUGE, 5, 50, 70]]},
                                                {"entity": "Paris", "type": "LOC", "boxes": None}]}),
             json.dumps({"id": "2", "answer": f"NBA|ORG|[{HUGE},0,1,1]"}),
             '{"id": "3", "answer": "x", "n": ' + "9" * 5000 + "}",  # beyond Python's integer digit limit
             '{"id": "3", "answer": ' + "[" * 100_000 + "]" * 100_000 + "}"]  # nested past the recursion limit
    pred = tmp_path / "pred.jsonl"
    pred.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "eval.json"
    res = CliRunner().invoke(app(), ["eval", "--gold", str(gold), "--pred", str(pred), "-o", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text(encoding="utf-8"))
    problems = report["prediction_problems"]
    assert any(":1: could not read the location of 'Alice Smith'" in p and "finite" in p for p in problems), problems
    assert sum(":3: unreadable JSON" in p or ":4: unreadable JSON" in p for p in problems) == 2, problems
    assert report["parse_status"] == {"missing": 1, "partial": 1, "unparsable": 1}  # Paris was still read on line 1
    assert (report["mner"]["correct"], report["mner"]["predicted"], report["gmner"]["correct"]) == (1, 1, 1)


def test_the_trl_gold_reader_reports_and_skips_bad_numbers(caplog):
    reward = make_trl_reward()
    logged = {}
    good = format_turn("t", "X|PER|None")
    golds = [[{"entity": "X", "type": "PER", "boxes": [[HUGE, 0, 1, 1]]}],
             [{"text": "X", "type": "PER", "boxes": [[float("nan"), 0, 1, 1]]}],
             f"X|PER|[{HUGE},0,1,1]", {"entities": [{"text": "X", "type": "PER", "boxes": [[0, 0, 1, 1]]}]}]
    out = reward(["p"] * 4, [good] * 4, gold=golds, log_metric=lambda k, v: logged.__setitem__(k, v))
    assert out == [None, None, None, pytest.approx(0.6)]  # R_u and R_e 0: the gold has a box, the answer says None
    assert logged["gmner/bad_gold"] == 3.0
    assert "finite" in read_gold(golds[0])[1] and "finite" in read_gold(golds[1])[1]
    assert any("row skipped" in r.message for r in caplog.records)


def test_numbers_that_are_not_finite_are_errors_not_exceptions():
    for text in (f"X|PER|[{HUGE},0,1,1]", "X|PER|[1e999,0,1,1]", "X|PER|[0,0,1e400,1]"):
        got = parse_answer(text)
        assert got.status == "unparsable" and "not a finite number" in got.errors[0], got
    assert boxes_from_value([HUGE, 0, 1, 1])[1] and boxes_from_value([float("inf"), 0, 1, 1])[1]
    assert boxes_from_value({"x1": HUGE, "y1": 0, "x2": 1, "y2": 1})[1]
    assert boxes_from_value([[[[[0, 0, 1, 1]]]]])[1] == "boxes nested too deeply"
    assert iou((0, 0, 1e300, 1e300), (0, 0, 1e300, 1e300)) == 0.0  # areas overflow: not a perfect match
    assert text_from_frame(f"[{HUGE},0,1,1]", 100, 100, FrameConfig(kind="qwen2_vl")) == f"[{HUGE},0,1,1]"


# --- fuzzing the eval reader ------------------------------------------------------------------------------------------

numbers = st.one_of(st.integers(-10**6, 10**6), st.just(HUGE), st.just(-HUGE), st.floats(allow_nan=True),
                    st.sampled_from(["1", "1e999", "nan", "x", ""]))
json_values = st.recursive(st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=20)),
                           lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                   st.dictionaries(st.sampled_from(
                                                       ["entity", "type", "boxes", "box", "bbox_2d", "text", "x1",
                                                        "y1", "x2", "y2", "name", "label"]), inner, max_size=5)),
                           max_leaves=20)
answer_texts = st.one_of(st.text(max_size=60), st.lists(st.sampled_from(
    ["X|PER|", "None", "[1,2,3,4]", f"[{HUGE},0,1,1]", "[1e999,0,1,1]", "; ", "<answer>", "</answer>", "|", "(1,2)",
     ",", "\n", '[{"entity": "X"']), max_size=8).map("".join))
lines = st.one_of(
    st.text(max_size=40),
    st.builds(lambda i, v: json.dumps({"id": i, "triples": v}), st.sampled_from(["1", "2", "x"]), json_values),
    st.builds(lambda i, v: json.dumps({"id": i, "triples": [v]}), st.sampled_from(["1", "2"]), json_values),
    st.builds(lambda i, a: json.dumps({"id": i, "answer": a}), st.sampled_from(["1", "2"]), answer_texts),
    st.builds(lambda i, v: json.dumps({"id": i, "answer": v}), st.sampled_from(["1", "2"]), json_values),
    st.sampled_from(['{"id": "1", "n": ' + "9" * 5000 + "}", "[" * 5000, '{"id": 1e999, "answer": NaN}']))
GOLD_RECORDS = [{"id": "1", "entities": [{"text": "X", "type": "PER", "boxes": [[0.0, 0.0, 1.0, 1.0]]}],
                 "tokens": ["X"]},
                {"id": "2", "entities": [{"text": "Y", "type": "LOC", "boxes": None}], "tokens": ["Y"]}]


@FUZZ
@given(st.lists(lines, max_size=6))
def test_fuzz_eval_reader_never_raises(rows):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pred.jsonl"
        path.write_text("\n".join(rows) + "\n", encoding="utf-8")
        preds = load_predictions([path], types=EvalConfig().types)
    for p in preds.by_id.values():
        assert p.status in ("ok", "partial", "unparsable", "empty")
        assert all(math.isfinite(v) for t in p.triples for b in t.boxes or () for v in b)
    report = evaluate(pair(GOLD_RECORDS, preds).samples).to_dict()
    assert 0.0 <= report["gmner"]["f1"] <= 1.0


# --- fuzzing the TRL adapter ------------------------------------------------------------------------------------------

completions = st.one_of(answer_texts, answer_texts.map(lambda a: format_turn("t", a)), st.none(), json_values,
                        st.lists(st.fixed_dictionaries({"role": st.just("assistant"), "content": answer_texts})))
golds = st.one_of(answer_texts, json_values, st.lists(json_values, max_size=3))


@FUZZ
@given(st.lists(st.tuples(completions, golds), min_size=1, max_size=4), st.sampled_from(["total", *COMPONENTS]),
       st.booleans())
def test_fuzz_trl_adapter_never_raises(rows, component, mcr):
    reward = make_trl_reward(RewardConfig.mcr() if mcr else None, component=component)
    out = reward(["p"] * len(rows), [c for c, _ in rows], gold=[g for _, g in rows], log_metric=lambda k, v: None)
    assert len(out) == len(rows)
    assert all(v is None or 0.0 <= v <= 1.0 for v in out)


# --- the two entry points agree ---------------------------------------------------------------------------------------

words = st.sampled_from(["Obama", "Barack", "New", "York", "NBA", "Paris", "per", "the"])
triples = st.lists(st.builds(Triple, st.lists(words, min_size=1, max_size=2).map(" ".join),
                             st.sampled_from(["PER", "LOC", "ORG", "OTHER", "per", "Loc"]),
                             st.one_of(st.none(), st.tuples(st.tuples(*[st.integers(0, 99).map(float)] * 2,
                                                                      *[st.integers(100, 200).map(float)] * 2)))),
                   max_size=4)
mutations = st.sampled_from([
    lambda a: format_turn("t", a), lambda a: a, lambda a: format_turn("t", a) + " extra", lambda a: f"<answer>{a}",
    lambda a: format_turn("t", a + "\nignore this"), lambda a: format_turn("t", a.replace("|", "│")),
    lambda a: format_turn("", a), lambda a: format_turn("t", a.replace("]", "", 1))])


@settings(max_examples=200, deadline=None)
@given(triples, triples, mutations, st.sampled_from([RewardConfig(), RewardConfig.mcr(),
                                                     RewardConfig(weights={"span": 1, "format": 1}),
                                                     RewardConfig(drop_zero_overlap_pairs=True)]))
def test_grpo_filter_and_trainer_entry_points_give_identical_numbers(pred, gold, mutate, config):
    completion = mutate(format_answer(pred))
    gold = parse_answer(format_answer(gold), config.types).triples  # gold as grpo_filter holds it (record triples)
    expected = gmner_reward(completion, gold, config)
    record_entities = [{"text": t.entity, "type": t.type, "boxes": [list(b) for b in t.boxes or ()]} for t in gold]
    assert gold_triples({"entities": record_entities}) == gold
    for column in (format_answer(gold), record_entities, gold):  # every gold column form the adapter reads
        for component in ("total", *COMPONENTS):
            got = make_trl_reward(config, component=component)(["p"], [completion], gold=[column])
            assert got == [getattr(expected, component)], (component, column)
        conversational = [{"role": "assistant", "content": [{"type": "text", "text": completion}]}]
        assert make_trl_reward(config)(["p"], [conversational], gold=[column]) == [expected.total]
