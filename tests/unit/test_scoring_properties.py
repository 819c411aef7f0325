"""Properties (hypothesis): rewards lie in [0, 1]; scores do not change when boxes and image are scaled together;
gold scored against itself gives F1 = 1 and every reward 1."""

from __future__ import annotations

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gmner_pipeline.answer import Triple, format_answer
from gmner_pipeline.scoring import EvalConfig, RewardConfig, Sample, evaluate, gmner_reward, reward_components
from gmner_pipeline.scoring.boxes import scale_box

WORDS = ["Obama", "Barack", "New", "York", "City", "NBA", "Paris", "the", "Lakers"]


@st.composite
def boxes(draw):
    x1, y1 = draw(st.integers(0, 900)), draw(st.integers(0, 900))
    return (float(x1), float(y1), float(x1 + draw(st.integers(1, 300))), float(y1 + draw(st.integers(1, 300))))


triple = st.builds(Triple, st.lists(st.sampled_from(WORDS), min_size=1, max_size=3).map(" ".join),
                   st.sampled_from(["PER", "LOC", "ORG", "OTHER"]),
                   st.one_of(st.none(), st.lists(boxes(), min_size=1, max_size=2).map(tuple)))
triples = st.lists(triple, max_size=6)
reward_config = st.builds(RewardConfig, sigma=st.floats(0.0, 0.95), pred_boxes=st.sampled_from(["all", "any", "first"]),
                          drop_zero_overlap_pairs=st.booleans())
COMPONENTS = ("count", "span", "type", "grounding", "entailment", "total")


@settings(max_examples=150, deadline=None)
@given(triples, triples, reward_config)
def test_every_reward_in_unit_interval(pred, gold, cfg):
    r = reward_components(pred, gold, cfg)
    for name in COMPONENTS:
        assert 0.0 <= getattr(r, name) <= 1.0, (name, r)


@settings(max_examples=100, deadline=None)
@given(triples, reward_config)
def test_gold_against_itself_is_perfect(gold, cfg):
    r = reward_components(gold, gold, cfg)
    assert all(getattr(r, name) == 1.0 for name in COMPONENTS), r
    assert gmner_reward(f"<think>x</think><answer>{format_answer(gold)}</answer>", gold, cfg).total == 1.0
    rep = evaluate([Sample("s", gold, list(reversed(gold)), tokens=" ".join(t.entity for t in gold).split())])
    if gold:
        assert rep.gmner.f1 == rep.mner.f1 == rep.eeg.f1 == 1.0
        assert rep.n_count == 0
        if any(t.boxes is None for t in gold):
            assert rep.textual_bias.f1 == 1.0
        if any(t.boxes is not None for t in gold):
            assert rep.accuracy(0.5) == rep.accuracy(0.75) == rep.mean_iou == 1.0


def scaled(ts, sx, sy):
    return [Triple(t.entity, t.type, None if t.boxes is None else tuple(scale_box(b, sx, sy) for b in t.boxes))
            for t in ts]


@settings(max_examples=100, deadline=None)
@given(triples, triples, st.sampled_from([0.25, 0.5, 2.0, 4.0, 8.0]), st.sampled_from([0.25, 0.5, 1.0, 2.0, 16.0]),
       st.sampled_from([0.5, 0.75]), st.booleans())
def test_evaluation_unchanged_when_boxes_and_image_scale_together(pred, gold, sx, sy, thr, strict):
    # powers of two scale exactly in floating point, so even IoU == threshold cases must agree
    cfg = EvalConfig(iou_threshold=thr, strict_iou=strict)
    before = evaluate([Sample("s", gold, pred)], cfg).to_dict()
    after = evaluate([Sample("s", scaled(gold, sx, sy), scaled(pred, sx, sy))], cfg).to_dict()
    assert before == after


@settings(max_examples=100, deadline=None)
@given(triples, triples, st.floats(0.05, 20.0), st.floats(0.05, 20.0), reward_config)
def test_rewards_unchanged_when_boxes_and_image_scale_together(pred, gold, sx, sy, cfg):
    assume(sx > 0 and sy > 0)
    a = reward_components(pred, gold, cfg)
    b = reward_components(scaled(pred, sx, sy), scaled(gold, sx, sy), cfg)
    for name in COMPONENTS:  # R_u is continuous in IoU, so any positive scale agrees up to rounding
        assert abs(getattr(a, name) - getattr(b, name)) < 1e-9, name
