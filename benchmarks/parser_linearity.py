"""Parser time on adversarial answers, as a ratio to a well-formed answer of the same length (issue #10).

    python benchmarks/parser_linearity.py [--size 1000000] [--repeats 3]

Each family repeats one separator, bracket, tag or record form up to ``--size`` characters (the shapes that made the
old regular-expression parser backtrack or rescan). A linear parser shows a flat ratio of a few units at every size;
run it at two sizes to see that it does not grow. The CI property test (tests/unit/test_answer_linear_time.py)
asserts a 25x budget on randomly built inputs of the same kinds.
"""

from __future__ import annotations

import argparse
import gc
import time

from gmner_pipeline.answer import parse_answer

RECORD = "Barack Obama|PER|[10,20,110,220]; Paris|LOC|None; "


def families(n: int) -> dict[str, str]:
    return {
        "box list cut off by the token limit": "Obama|PER|" + "[10,20,110,220] " * (n // 16) + "[10,2",
        "(x1, y1) , (x2, y2) pairs, cut off": "Obama|PER|" + "(1, 2) , (3, 4) " * (n // 16) + "(1,",
        "whitespace between the numbers of a box": "Obama|PER|[1" + "  " * (n // 2) + "2 3 4 x",
        "unclosed <answer> tags": "<answer>" * (n // 8),
        "unclosed <think> tags": "<think>" * (n // 7),
        "closing before opening tags": "</answer><answer>" * (n // 17),
        "unclosed code fences": "```" * (n // 3),
        "quotes around a field": "Obama|" + '"' * n + "|None",
        "';' inside an entity": ";a" * (n // 2) + "|PER|None",
        "bars only": "|" * n,
        "JSON list cut off": "[" + "1," * (n // 2),
        "JSON list of triples": "[" + '["Obama", "PER", [1,2,3,4]], ' * (n // 30) + "]",
        "prose lines": "a\n" * (n // 2),
        "numbered records": "1. A|PER|None\n" * (n // 15),
        "look-alike bars": "A│PER│None; " * (n // 12),
        "commas after a location": "A|PER|[1,2,3,4]" + " ," * (n // 2),
        "box-only segments": "A|PER|[1,2,3,4]" + "; [1,2,3,4]" * (n // 11),
    }


def best_time(text: str, repeats: int) -> float:
    gc.collect()
    gc.disable()
    try:
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            parse_answer(text, max_chars=None)
            best = min(best, time.perf_counter() - start)
        return best
    finally:
        gc.enable()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1_000_000, help="characters per input")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many timings")
    args = ap.parse_args()
    body = (RECORD * (args.size // len(RECORD) + 2))[:args.size - 40]
    well_formed = f"<think>reasoning</think><answer>{body[:body.rfind(';')]}</answer>"
    base = best_time(well_formed, args.repeats) / len(well_formed)
    print(f"well-formed answer, {len(well_formed):,} chars: {base * len(well_formed):.3f} s")
    worst = 0.0
    for name, text in families(args.size).items():
        took = best_time(text, args.repeats)
        ratio = took / len(text) / base
        worst = max(worst, ratio)
        print(f"{name:42s} {len(text):>10,} chars {took:8.3f} s  ratio {ratio:6.2f}")
    print(f"worst ratio: {worst:.2f}")


if __name__ == "__main__":
    main()
