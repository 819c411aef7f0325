"""Parsing time is linear in the input (issue #10): adversarial answers (repetitions of every separator and bracket
form, truncated at any position, up to 1 MB) must parse within a budget measured as a RATIO to parsing a well-formed
answer of the same length, never as an absolute time. The old regex parser took seconds on 335 characters (a box
list cut off after twenty boxes) and effectively never finished on 1 MB of unclosed tags.

Timing on a shared 2-core machine is noisy, so: the well-formed reference is the best of 5 timings, an input is timed
once and, when that single timing gives a ratio above 2, again as the best of 3 (and of 5 above half the bound); short
inputs are timed in batches of at least 5 ms and the garbage collector is paused while timing. The bound (25x) is far
above the worst ratio a linear parser shows here (about 5x, box-only segments at 1 MB) and far below what a
super-linear one shows (the old parser: over 10,000x on the issue's first example). The worst ratio observed is printed
(``pytest -s``) and recorded as the test property ``worst_parser_ratio``. About 20 s on an idle 2-core machine.
"""

from __future__ import annotations

import gc
import re
import time

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gmner_pipeline.answer import MAX_ANSWER_CHARS, Triple, extract_answer, extract_think, parse_answer

RATIO_BOUND = 25.0
RECORD = "Barack Obama|PER|[10,20,110,220]; Paris|LOC|None; "


def parse(text: str):
    return parse_answer(text, max_chars=None)  # no cap: the parser itself must be linear, not just the cap


def seconds_per_call(text: str, repeats: int) -> float:
    best, number = float("inf"), 1
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeats):
            while True:
                start = time.perf_counter()
                for _ in range(number):
                    parse(text)
                took = time.perf_counter() - start
                if took >= 0.005:
                    break
                number *= 4
            best = min(best, took / number)
    finally:
        gc.enable()
    return best


def well_formed(n: int) -> str:
    body = (RECORD * (n // len(RECORD) + 2))[:max(n - 40, len(RECORD))]
    return f"<think>reasoning</think><answer>{body[:body.rfind(';')]}</answer>"


_BASELINE: dict[int, tuple[float, int]] = {}


def baseline_per_char(size: int) -> float:
    if size not in _BASELINE:
        text = well_formed(size)
        assert parse(text).ok
        _BASELINE[size] = (seconds_per_call(text, repeats=5), len(text))
    took, length = _BASELINE[size]
    return took / length


# Every separator and bracket form the parser knows, tags, fences, quotes, numbers and whole records.
FORMS = [" ", "  ", "\t", "\n", ",", ", ", " , ", ";", "; ", "|", "｜", "│", "丨", "∣", "；", "，", "、", ".", ":",
         "-", "[", "]", "(", ")", "［", "］", "【", "】", "（", "）", "{", "}", "[[", "]]", "<answer>", "</answer>",
         "<think>", "</think>", "<ANSWER>", "```", "```json\n", "<|box_start|>", "<|box_end|>", '"', "'", "*", "**",
         "`", "“", "10", "-1.5e3", "1.", "None", "null", "[]", "Obama", "PER", "1. ", "- ", "Answer:", "The answer is: ",
         "[10,20,110,220]", "[10 20 110 220]", "(10,20),(110,220)", "(10, 20) , (110, 220)", "(10,20,110,220)",
         "[[10,20,110,220],[1,2,3,4]]", "Obama|PER|None", "Obama|PER|[10,20,110,220]", "[10,20,110,220]|Obama|PER",
         '{"entity": "Obama", "type": "PER", "box": [10,20,110,220]}', '["Obama", "PER", null]', "{'name': 'A'}"]
PREFIXES = ["", "Obama|PER|", "<think>x</think><answer>", "<answer>Obama|PER|", "[", "{", "Answer: ", "1. A|PER|None\n",
            "```json\n", "A|PER|[1,2,3,4]; ", "Here you go:\n", "Obama|PER|[1,"]
SUFFIXES = ["", "[10,2", "(1, 2) , (3,", "|None", "2,3,4", "</answer>", "</think>", "]", "}", "```", "\n", "x"]
SIZES = [300] * 3 + [2_000] * 3 + [30_000] * 3 + [1_000_000]  # drawn uniformly: one input in ten is 1 MB


def build(prefix: str, unit: str, size: int, cut: int, suffix: str) -> str:
    reps = max(1, (size - len(prefix) - len(suffix)) // len(unit))
    return prefix + unit * reps + unit[:cut % (len(unit) + 1)] + suffix


_WORST: list[tuple[float, str]] = []


@settings(max_examples=50, deadline=None, derandomize=True, report_multiple_bugs=False,
          suppress_health_check=list(HealthCheck))
@given(st.sampled_from(PREFIXES), st.lists(st.sampled_from(FORMS), min_size=1, max_size=4).map("".join),
       st.sampled_from(SIZES), st.integers(0, 200), st.sampled_from(SUFFIXES))
# the inputs: a box list cut off by the token limit, the (x1, y1) , (x2, y2) form, whitespace inside a box,
# unclosed tags at 32 KB and 1 MB
@example("Obama|PER|", "[10,20,110,220] ", 335, 0, "[10,2")
@example("Obama|PER|", "(1, 2) , (3, 4) ", 333, 0, "(1,")
@example("Obama|PER|[1", "  ", 2_000, 0, "2 3 4 x")
@example("Obama|PER|", "[1,2,3,4]   ", 2_000, 0, "[1,2")
@example("", "<answer>", 32_000, 0, "")
@example("", "<think>", 1_000_000, 0, "")
@example("A|PER|[1,2,3,4]", "; [1,2,3,4]", 1_000_000, 0, "")
def _parse_time_within_budget(prefix, unit, size, cut, suffix):
    text = build(prefix, unit, size, cut, suffix)
    ratio = float("inf")
    for repeats, above in ((1, 0.0), (3, 2.0), (5, RATIO_BOUND / 2)):  # time again only where it matters
        if ratio > above:  # a busy machine slows single timings: the best of several is the parser's own time
            ratio = min(ratio, seconds_per_call(text, repeats) / len(text) / baseline_per_char(size))
    _WORST.append((ratio, f"{prefix!r} + {unit!r} * n + {suffix!r} ({len(text)} chars)"))
    assert ratio <= RATIO_BOUND, f"parsing took {ratio:.1f}x a well-formed answer of the same length: {_WORST[-1][1]}"


def test_parsing_time_is_linear(record_property):
    _WORST.clear()
    _parse_time_within_budget()
    ratio, where = max(_WORST)
    record_property("worst_parser_ratio", round(ratio, 2))
    print(f"\nworst parser time ratio to a well-formed answer of the same length: {ratio:.2f} over {len(_WORST)} "
          f"inputs, at {where}")


def test_answers_longer_than_the_cap_are_unparsable_with_the_reason():
    long = "<think>x</think><answer>" + "Obama|PER|None; " * 2_000 + "</answer>"
    got = parse_answer(long)
    assert got.status == "unparsable" and got.triples == []
    assert "more than the limit of 16384" in got.errors[0] and MAX_ANSWER_CHARS == 16_384
    assert parse_answer(long, max_chars=None).triples == [Triple("Obama", "PER", None)] * 2_000
    assert parse_answer(long, max_chars=40_000).ok
    # the cap is on the answer, not the reasoning: a long <think> does not count
    assert parse_answer("<think>" + "x" * 100_000 + "</think><answer>Obama|PER|None</answer>").ok


def test_tag_extraction_keeps_its_meaning():
    # closed <think> blocks go first; the last complete <answer> block wins; an unclosed <answer> runs to the end;
    # without answer tags an unclosed <think> runs to the end
    assert extract_answer("<think>a <answer>X</answer></think><answer>Y</answer>") == "Y"
    assert extract_answer("<answer>A</answer><answer>B</answer>") == "B"
    assert extract_answer("<answer>a<answer>b</answer>") == "a<answer>b"
    assert extract_answer("x <answer>open ended") == "open ended"
    assert extract_answer("before <think>never closed <answer>X</answer>") == "X"
    assert extract_answer("before <think>never closed") == "before"
    assert extract_answer("<THINK>t</Think><Answer>Z</ANSWER>") == "Z"
    assert extract_think("<think> a </think><think>b</think>") == "a"
    assert extract_think("<think>unclosed") == "unclosed"
    assert extract_think("no tags") is None


# The regular expressions the tag extraction replaced: right, but quadratic on many unclosed tags. On short inputs
# they are the reference the one-pass scan must agree with.
_OLD_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.S | re.I)
_OLD_ANSWER_OPEN = re.compile(r"<answer>(.*)$", re.S | re.I)
_OLD_THINK_BLOCK = re.compile(r"<think>.*?(?:</think>|$)", re.S | re.I)
_OLD_THINK_CLOSED = re.compile(r"<think>.*?</think>", re.S | re.I)
_OLD_THINK_TAG = re.compile(r"<think>(.*?)(?:</think>|$)", re.S | re.I)


def old_extract_answer(text: str) -> str:
    text = _OLD_THINK_CLOSED.sub("", text)
    blocks = _OLD_ANSWER_BLOCK.findall(text)
    if blocks:
        return blocks[-1].strip()
    m = _OLD_ANSWER_OPEN.search(text)
    return m.group(1).strip() if m else _OLD_THINK_BLOCK.sub("", text).strip()


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(["<answer>", "</answer>", "<think>", "</think>", "<Answer>", "</THINK>", "a", " ",
                                 "\n", "b|c"]), max_size=14).map("".join))
def test_one_pass_tag_extraction_agrees_with_the_old_patterns(text):
    assert extract_answer(text) == old_extract_answer(text)
    m = _OLD_THINK_TAG.search(text)
    assert extract_think(text) == (m.group(1).strip() if m else None)
