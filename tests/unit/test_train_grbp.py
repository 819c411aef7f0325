"""GRBP statistics: truncation, the IoU guard, the small-box rule, the scale clamp, clipping, determinism."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from scipy.stats import kstest, truncnorm

from gmner_pipeline.train.grbp import Geometry, GRBPConfig, GRBPStats, example_rng, iou, perturb_box, perturb_turn

BIG = Geometry(10_000.0, 10_000.0)  # no clipping in play
N = 3000
TRUNC_STD = 0.8796  # std of N(0, 1) truncated at +-2, in units of sigma


def _draws(box, config, geometry=BIG, n=N, integer=False, seed=0):
    rng = np.random.default_rng(seed)
    stats = GRBPStats()
    return np.array([perturb_box(box, rng, geometry, config, integer=integer, stats=stats) for _ in range(n)]), stats


def _centre_shift(out, box):
    w, h = box[2] - box[0], box[3] - box[1]
    dx = ((out[:, 0] + out[:, 2]) / 2 - (box[0] + box[2]) / 2) / w
    dy = ((out[:, 1] + out[:, 3]) / 2 - (box[1] + box[3]) / 2) / h
    return dx, dy


def test_centre_noise_is_a_gaussian_truncated_at_two_sigma():
    box = (1000.0, 1000.0, 1400.0, 1300.0)
    out, stats = _draws(box, GRBPConfig(tau=0.0))
    dx, dy = _centre_shift(out, box)
    sigma = 0.1 / math.sqrt(3)
    for d in (dx, dy):
        assert np.abs(d).max() <= 2 * sigma + 1e-9  # truncation
        assert np.abs(d).max() > 1.8 * sigma  # and the tails are reached
        assert d.std() == pytest.approx(TRUNC_STD * sigma, rel=0.06)
        assert abs(d.mean()) < 0.1 * sigma
        assert kstest(d / sigma, truncnorm(-2, 2).cdf).pvalue > 1e-3  # the law itself, not just its moments
    assert stats.perturbed == N and stats.kept_original == 0


def test_scale_noise_and_clamp():
    box = (1000.0, 1000.0, 1400.0, 1300.0)
    out, _ = _draws(box, GRBPConfig(tau=0.0))
    scale = (out[:, 2] - out[:, 0]) / 400.0
    sigma = 0.1 / math.sqrt(3)
    assert np.abs(scale - 1).max() <= 2 * sigma + 1e-9
    assert (scale - 1).std() == pytest.approx(TRUNC_STD * sigma, rel=0.06)
    # a huge gamma: the factor 1 + delta is clamped to [0.2, 5.0]
    wide, _ = _draws(box, GRBPConfig(tau=0.0, beta=0.0, gamma=20.0, scale_clamp=(0.2, 5.0)), n=500)
    factors = (wide[:, 2] - wide[:, 0]) / 400.0
    assert factors.min() == pytest.approx(0.2) and factors.max() == pytest.approx(5.0)
    assert ((factors >= 0.2 - 1e-9) & (factors <= 5.0 + 1e-9)).all()


def test_small_boxes_get_half_the_noise():
    big_box, small_box = (1000.0, 1000.0, 1400.0, 1300.0), (1000.0, 1000.0, 1020.0, 1030.0)  # 600 px² < 32²
    big, _ = _draws(big_box, GRBPConfig(tau=0.0))
    small, stats = _draws(small_box, GRBPConfig(tau=0.0))
    assert stats.small == N
    ratio = _centre_shift(small, small_box)[0].std() / _centre_shift(big, big_box)[0].std()
    assert ratio == pytest.approx(0.5, rel=0.08)
    # the rule reads pixels: in a 0-1000 frame over a 10000 px wide image, a 20-unit box is 200 px wide, not small
    _, frame_stats = _draws((100.0, 100.0, 120.0, 130.0), GRBPConfig(tau=0.0), Geometry(1000, 1000, 10.0, 10.0), n=50)
    assert frame_stats.small == 0


def test_iou_guard_keeps_every_accepted_box_above_tau_and_falls_back_to_the_original():
    box = (100.0, 100.0, 200.0, 180.0)
    config = GRBPConfig(beta=1.5, gamma=1.5, tau=0.6)  # noise so large that many draws fail the guard
    out, stats = _draws(box, config, n=1000, integer=True)
    ious = np.array([iou(b, box) for b in out])
    assert (ious >= 0.6).all()
    assert stats.kept_original > 0 and stats.perturbed > 0
    assert stats.draws <= 5 * 1000
    assert (out == np.array(box)).all(axis=1).sum() >= stats.kept_original
    never = GRBPConfig(tau=1.0)  # nothing but the original passes a guard of 1 (beyond exact rounding luck)
    out, stats = _draws(box, never, n=200, integer=False)
    assert stats.kept_original == 200 and (out == np.array(box)).all()
    assert stats.draws == 200 * 5  # five tries each


def test_boxes_are_clipped_to_the_frame_and_stay_two_pixels_wide():
    geometry = Geometry(100.0, 80.0)
    box = (90.0, 0.0, 100.0, 6.0)  # in the top-right corner
    out, _ = _draws(box, GRBPConfig(beta=0.5, gamma=0.5, tau=0.0), geometry, n=2000, integer=True)
    assert (out[:, 0] >= 0).all() and (out[:, 1] >= 0).all()
    assert (out[:, 2] <= 100).all() and (out[:, 3] <= 80).all()
    assert ((out[:, 2] - out[:, 0]) >= 2).all() and ((out[:, 3] - out[:, 1]) >= 2).all()
    tiny = (50.0, 40.0, 52.0, 42.0)
    shrunk, _ = _draws(tiny, GRBPConfig(beta=0.0, gamma=0.9, scale_clamp=(0.2, 5.0), tau=0.0), geometry, n=300,
                       integer=True)
    assert ((shrunk[:, 2] - shrunk[:, 0]) >= 2).all()
    # 2 px in a 0-1000 frame over a 100 px image is 20 units
    frame = Geometry(1000.0, 1000.0, 0.1, 0.1)
    out, _ = _draws((500.0, 500.0, 520.0, 520.0), GRBPConfig(beta=0.0, gamma=0.9, tau=0.0), frame, n=300)
    assert ((out[:, 2] - out[:, 0]) >= 20 - 1e-9).all()


def test_noise_is_deterministic_per_seed_epoch_and_example():
    box, config = (10.0, 10.0, 60.0, 50.0), GRBPConfig()
    geometry = Geometry(100.0, 80.0)

    def draw(seed, epoch, example):
        return perturb_box(box, example_rng(seed, epoch, example), geometry, config, integer=False)

    assert draw(1, 0, "a#0") == draw(1, 0, "a#0")
    assert draw(1, 0, "a#0") != draw(1, 1, "a#0")  # fresh noise each epoch
    assert draw(1, 0, "a#0") != draw(2, 0, "a#0")
    assert draw(1, 0, "a#0") != draw(1, 0, "a#1")


def test_turn_rewrites_answer_boxes_and_the_same_boxes_in_the_reasoning_only():
    turn = ("<think>The player is at [10,5,50,70]; a detector saw a person at [0,0,99,79].</think>"
            "<answer>Alice|PER|[10,5,50,70]; Bob|PER|[60,10,90,60]; Paris|LOC|None</answer>")
    out = perturb_turn(turn, example_rng(0, 0, "x"), Geometry(100.0, 80.0), GRBPConfig(beta=0.3, gamma=0.3))
    answer = re.search(r"<answer>(.*)</answer>", out).group(1)
    think = re.search(r"<think>(.*)</think>", out).group(1)
    boxes = re.findall(r"\[[^\]]+\]", answer)
    assert boxes[0] != "[10,5,50,70]" and boxes[1] != "[60,10,90,60]"  # perturbed (noise 0.3 makes a no-op unlikely)
    assert boxes[0] in think  # the reasoning quotes the same perturbed box
    assert "[0,0,99,79]" in think  # a box that is not an answer box is left as written
    assert "Paris|LOC|None" in answer and "[10,5,50,70]" not in out
    disabled = perturb_turn(turn, example_rng(0, 0, "x"), Geometry(100.0, 80.0), GRBPConfig(enabled=False))
    assert disabled == turn
    assert perturb_turn(turn, example_rng(0, 0, "x"), Geometry(0.0, 0.0), GRBPConfig()) == turn  # no image size


def test_config_refuses_an_impossible_clamp():
    with pytest.raises(ValueError):
        GRBPConfig(scale_clamp=(1.5, 5.0))
