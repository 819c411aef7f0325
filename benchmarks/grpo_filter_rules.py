"""How much of D2 each GRPO filter rule removes, with the project's safe reward defaults against MCR's reward as
published, on simulated SFT-policy completions of Twitter-GMNER train.

    python benchmarks/grpo_filter_rules.py [--data DIR (default: $GMNER_DATA or ../shared)] [--limit 7000] [--seed 0]

No SFT policy of the papers' quality runs here (no Qwen weights offline), so completions are simulated from the gold
with an error model, per item and per sample:

* each item gets a quality q ~ Beta(k * m, k * (1 - m)) (items differ in difficulty; m is the mean quality, k how
  alike items are); each of its G = 8 samples then, per gold entity: is recognised with probability q (else left
  out), gets its exact span with probability q (else one token dropped or added at its end), its type with
  probability q (else another type), its visibility with probability q (else flipped); a visible, correctly judged
  entity gets a box of IoU 0.5-0.95 with the gold box with probability q, else one of IoU < 0.5; plus one spurious
  entity (a random token run of the tweet) with probability (1 - q) / 2;
* independently, a sample breaks the turn format (unclosed tag, prose after the answer, or no reasoning) with
  probability ``--format-errors`` (temperature 1.5 makes such breaks likelier than at evaluation).

For each mean quality m, the script prints the samples' GMNER F1 (evaluation rules: exact span and type, IoU >= 0.5),
and, for both reward configs, the share of items kept and removed by each rule (first failing rule), plus the share of
samples scoring exactly 0. Thresholds: MCR's (std >= 0.1, max >= 0.8, 0.08 <= median <= 0.6).
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TYPES = ("PER", "LOC", "ORG", "OTHER")
G = 8


def jitter_box(box: tuple[float, ...], rng: random.Random, good: bool, size: tuple[int, int]) -> tuple[float, ...]:
    """A box with IoU in [0.5, 0.95] of ``box`` (good) or below 0.5 (not good), found by rejection sampling."""
    from gmner_pipeline.scoring import iou

    x1, y1, x2, y2 = box
    w, h = max(x2 - x1, 2.0), max(y2 - y1, 2.0)
    spread = 0.15 if good else 0.8
    for _ in range(200):
        cx = (x1 + x2) / 2 + rng.gauss(0, spread) * w
        cy = (y1 + y2) / 2 + rng.gauss(0, spread) * h
        sw, sh = w * (1 + rng.gauss(0, spread)), h * (1 + rng.gauss(0, spread))
        if sw < 2 or sh < 2:
            continue
        cand = (cx - sw / 2, cy - sh / 2, cx + sw / 2, cy + sh / 2)
        value = iou(cand, box)
        if (0.5 <= value <= 0.95) if good else value < 0.5:
            return tuple(round(v) for v in cand)
    return tuple(round(v) for v in box) if good else (0.0, 0.0, float(size[0]) / 10, float(size[1]) / 10)


def sample_completion(record: dict[str, Any], q: float, rng: random.Random, format_errors: float) -> str:
    from gmner_pipeline.answer import Triple, format_answer

    tokens = record["tokens"]
    size = (record["image"]["width"] or 500, record["image"]["height"] or 500)
    triples = []
    for ent in record["entities"]:
        if rng.random() > q:
            continue  # missed
        start, end = ent["start"], ent["end"]
        if rng.random() > q:  # a boundary error at the end of the span
            end = end - 1 if end - start > 1 and rng.random() < 0.5 else min(end + 1, len(tokens))
        text = " ".join(tokens[start:end])
        etype = ent["type"] if rng.random() <= q else rng.choice([t for t in TYPES if t != ent["type"]])
        visible = bool(ent["boxes"])
        judged_visible = visible if rng.random() <= q else not visible
        boxes = None
        if judged_visible:
            if visible:
                boxes = (jitter_box(tuple(ent["boxes"][0]), rng, rng.random() <= q, size),)
            else:
                boxes = ((round(size[0] * 0.2), round(size[1] * 0.2), round(size[0] * 0.6), round(size[1] * 0.7)),)
        triples.append(Triple(text, etype, boxes))
    if rng.random() < (1 - q) / 2 and tokens:
        start = rng.randrange(len(tokens))
        triples.append(Triple(" ".join(tokens[start:start + rng.choice((1, 2))]), rng.choice(TYPES), None))
    rng.shuffle(triples)
    answer = format_answer(triples)
    think = "The tweet names these entities; I check each against the image."
    if rng.random() < format_errors:
        return rng.choice([f"<think>{think}</think><answer>{answer}",  # unclosed answer (cut at max tokens)
                           f"<think>{think}</think><answer>{answer}</answer> Hope this helps!",
                           f"<answer>{answer}</answer>"])
    return f"<think>{think}</think><answer>{answer}</answer>"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from common import DEFAULT_DATA  # $GMNER_DATA, else ../shared (beside the checkout or its worktrees folder)

    ap.add_argument("--data", default=str(DEFAULT_DATA) if DEFAULT_DATA else None)
    ap.add_argument("--limit", type=int, default=7000, help="train tweets used (7,000 in all)")
    ap.add_argument("--means", default="0.75,0.8,0.85,0.9", help="mean per-decision quality m, comma-separated")
    ap.add_argument("--concentration", type=float, default=4.0, help="k: higher = items more alike")
    ap.add_argument("--format-errors", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from gmner_pipeline.answer import gold_triples, parse_answer
    from gmner_pipeline.ingest.twitter_gmner import read_twitter_gmner
    from gmner_pipeline.scoring import EvalConfig, GrpoFilterConfig, RewardConfig, evaluate, gmner_reward, group_stats
    from gmner_pipeline.scoring.evaluate import Sample

    if not args.data or not Path(args.data).is_dir():
        sys.exit(f"{args.data} not found: pass --data <Twitter-GMNER v2 folder> (or set GMNER_DATA)")
    records = [r for r in read_twitter_gmner(args.data, "train", limit=args.limit) if r["status"] == "ok"]
    configs = {"safe (RewardConfig())": RewardConfig(), "MCR (RewardConfig.mcr())": RewardConfig.mcr()}
    filt = GrpoFilterConfig()
    print(f"{len(records)} Twitter-GMNER train tweets, G = {G}, k = {args.concentration}, "
          f"format errors {args.format_errors:.0%}, seed {args.seed}")
    header = f"{'m':>5} {'F1':>6} {'reward':<26} {'kept':>6} {'low_std':>8} {'low_max':>8} {'med<':>6} {'med>':>6}" \
             f" {'zero':>6} {'mean R':>7}"
    print(header)
    for m in (float(x) for x in args.means.split(",")):
        rng = random.Random(f"{args.seed}-{m}")
        groups = []
        samples = []
        for rec in records:
            q = rng.betavariate(args.concentration * m, args.concentration * (1 - m))
            texts = [sample_completion(rec, q, rng, args.format_errors) for _ in range(G)]
            gold = gold_triples(rec)
            groups.append((texts, gold))
            samples += [Sample(rec["id"], gold, parse_answer(t, TYPES).triples) for t in texts]
        f1 = evaluate(samples, EvalConfig()).gmner.f1
        for name, config in configs.items():
            reasons: Counter[str] = Counter()
            zeros = total = 0
            reward_sum = 0.0
            for texts, gold in groups:
                rewards = [gmner_reward(t, gold, config).total for t in texts]
                zeros += sum(r == 0 for r in rewards)
                total += len(rewards)
                reward_sum += sum(rewards)
                s = group_stats(rewards, filt)
                reasons["kept" if s.keep else s.reason] += 1
            n = len(groups)
            print(f"{m:5.2f} {f1:6.3f} {name:<26} {reasons['kept'] / n:6.1%} {reasons['low_std'] / n:8.1%} "
                  f"{reasons['low_max'] / n:8.1%} {reasons['median_below'] / n:6.1%} "
                  f"{reasons['median_above'] / n:6.1%} {zeros / total:6.1%} {reward_sum / total:7.3f}", flush=True)


if __name__ == "__main__":
    main()
