"""The one answer parser: canonical format, teacher variants, explicit statuses, never raising."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gmner_pipeline.answer import (PARSE_STATUSES, Triple, extract_answer, format_answer, format_turn, parse_answer,
                                   same_triples, scan_boxes)

TYPES = ["PER", "LOC", "ORG", "OTHER"]
OBAMA = Triple("Barack Obama", "PER", ((1.0, 2.0, 30.0, 40.0),))
PARIS = Triple("Paris", "LOC", None)


def read(text, **kw):
    return parse_answer(text, **kw)


@pytest.mark.parametrize("text", [
    "Barack Obama|PER|[1,2,30,40]; Paris|LOC|None",
    "<think>reasoning</think><answer>Barack Obama|PER|[1,2,30,40]; Paris|LOC|None</answer>",
    "Barack Obama｜PER｜［1，2，30，40］；Paris｜LOC｜None",  # full-width separators
    "  Barack   Obama |  PER | [ 1 , 2 , 30 , 40 ] ;   Paris | LOC | None  ",  # extra whitespace
    "Barack Obama|PER|(1,2,30,40); Paris|LOC|null",
    "Barack Obama|PER|(1,2),(30,40); Paris|LOC|none",
    "Barack Obama|PER|[1 2 30 40]; Paris|LOC|[]",
    "Barack Obama|PER|[1,2,30,40]\nParis|LOC|None",  # one record per line
    "1. Barack Obama|PER|[1,2,30,40]\n2. Paris|LOC|None",  # numbered list
    "- Barack Obama|PER|[1,2,30,40]\n- Paris|LOC|None",
    "The answer is: Barack Obama|PER|[1,2,30,40]; Paris|LOC|None",  # lead-in on the same line
    "Entities found:\nBarack Obama|PER|[1,2,30,40]; Paris|LOC|None\nThat is all.",  # prose lines around
    "I looked at the image <answer>Barack Obama|PER|[1,2,30,40]; Paris|LOC|None</answer> done",
    "Barack Obama|PER|[1,2,30,40]; Paris|LOC|None.",  # trailing full stop
    '"Barack Obama"|"PER"|[1,2,30,40]; **Paris**|LOC|"None"',  # quoted / emphasised fields
    "[1,2,30,40]|Barack Obama|PER; None|Paris|LOC",  # location first
    '[{"entity": "Barack Obama", "type": "PER", "bbox_2d": [1, 2, 30, 40]}, {"name": "Paris", "label": "LOC", '
    '"box": null}]',
    '```json\n[["Barack Obama", "PER", [1, 2, 30, 40]], ["Paris", "LOC", null]]\n```',
    '{"entities": [{"entity": "Barack Obama", "type": "PER", "boxes": [[1, 2, 30, 40]]}, '
    '{"entity": "Paris", "type": "LOC", "location": "None"}]}',
    "[{'entity': 'Barack Obama', 'type': 'PER', 'box': (1, 2, 30, 40)}, {'entity': 'Paris', 'type': 'LOC'}]",
    "Barack Obama|PER|[1,2,30,40], Paris|LOC|None",  # records separated by ','
    "Barack Obama|PER|<|box_start|>(1,2),(30,40)<|box_end|>; Paris|LOC|None",  # Qwen-VL box markup
    'Here is what I found:\n[["Barack Obama", "PER", [1, 2, 30, 40]], ["Paris", "LOC", "None"]]\nHope it helps.',
])
def test_variants_with_clear_meaning_parse_ok(text):
    got = read(text)
    assert got.status == "ok", got
    assert got.triples == [OBAMA, PARIS]


def test_canonical_round_trip_with_several_boxes_and_semicolon_in_entity():
    triples = [Triple("Fox &amp ; Fin Financial Group", "ORG", None),
               Triple("I , Daniel Blake", "OTHER", ((0.0, 0.0, 5.0, 5.0), (6.0, 6.0, 9.0, 9.0))),
               Triple("*Donald Trump", "PER", None)]
    text = format_answer(triples)
    assert text == ("Fox &amp ; Fin Financial Group|ORG|None; I , Daniel Blake|OTHER|[0,0,5,5],[6,6,9,9]; "
                    "*Donald Trump|PER|None")
    got = read(format_turn("think", text))
    assert got.status == "ok" and got.notes == [] and got.triples == triples


@pytest.mark.parametrize("text", [
    "X|PER|[1,2,3,4],[5,6,7,8]", "X|PER|[[1,2,3,4],[5,6,7,8]]", "X|PER|[1,2,3,4]; [5,6,7,8]",
    "X|PER|[1,2,3,4] [5,6,7,8]", '[{"entity": "X", "type": "PER", "boxes": [[1,2,3,4],[5,6,7,8]]}]',
])
def test_several_boxes_for_one_entity(text):
    got = read(text)
    assert got.status == "ok"
    assert got.triples == [Triple("X", "PER", ((1, 2, 3, 4), (5, 6, 7, 8)))]


@pytest.mark.parametrize("text", ["None", "none", "None.", "NONE", "[]", "null", "<answer>None</answer>",
                                  "Answer: None", "No entities found.", '{"entities": []}', "<think>x</think>None"])
def test_no_entity(text):
    got = read(text)
    assert (got.status, got.triples) == ("ok", [])


def test_types_fix_case_and_swapped_fields():
    got = read("PER|Obama|None; paris|loc|None", types=TYPES)
    assert got.status == "ok"
    assert got.triples == [Triple("Obama", "PER", None), Triple("paris", "LOC", None)]
    assert any("swapped" in n for n in got.notes)
    # without the label set the order is taken as written
    assert read("PER|Obama|None").triples == [Triple("PER", "Obama", None)]


@pytest.mark.parametrize("text,status", [
    ("Obama|PER|None; garbage without pipes|x", "partial"),
    ("Obama|PER|None; Paris|LOC|[1,2,3]", "partial"),  # a box needs four numbers
    ("Obama|PER|None; Paris|LOC", "partial"),
    ("Obama|PER|[1,2,3]", "unparsable"),
    ("I do not see any named entity here, sorry.", "unparsable"),
    ("Obama PER None", "unparsable"),
    ('[{"entity": "Obama"}]', "unparsable"),
    ('[{"entity": "Obama", "type": "PER", "box": [1, 2]}, {"entity": "Paris", "type": "LOC", "box": null}]', "partial"),
    ("", "empty"), ("<answer></answer>", "empty"), (None, "empty"),
])
def test_unclear_input_is_explicit(text, status):
    got = read(text)
    assert got.status == status
    assert got.status == "ok" or got.errors


def test_last_answer_block_wins_and_think_is_ignored():
    text = "<think>maybe A|PER|None</think><answer>A|PER|None</answer> wait <answer>B|LOC|None</answer>"
    got = read(text)
    assert got.triples == [Triple("B", "LOC", None)] and any("several" in n for n in got.notes)
    assert extract_answer("<think>A|PER|None</think>B|LOC|None") == "B|LOC|None"
    assert extract_answer("<answer>unclosed A|PER|None") == "unclosed A|PER|None"
    mentioned = "<think>I will put it in <answer> tags</think><answer>A|PER|None</answer>"
    assert read(mentioned).triples == [Triple("A", "PER", None)] and read(mentioned).notes == []


def test_box_only_segment_after_a_none_location_is_an_error():
    got = read("X|PER|None; [1,2,3,4]")
    assert got.status == "partial" and got.triples == [Triple("X", "PER", None)]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab|;[](),.0123456789 \n:-{}\"'<>/answerthinkNone｜；［］，")),
               max_size=80))
def test_never_raises(text):
    got = parse_answer(text)
    assert got.status in PARSE_STATUSES
    assert all(isinstance(t, Triple) for t in got.triples)


word = st.sampled_from(["Obama", "New", "York", "&amp", ";", ",", ".", "'s", "#NBA", "@user", "St.", "I", "None",
                        "Koché", "2", "-", "\"", "*Trump"])
# An entity may contain ";" (Twitter has "Fox &amp ; Fin") but cannot begin with it: a leading ";" is a separator.
# A field wrapped whole in quotes or emphasis ("Obama", **Obama**) is read without them (no Twitter entity is).
entity = (st.lists(word, min_size=1, max_size=4).filter(lambda ws: ws[0] != ";").map(" ".join)
          .filter(lambda e: not (len(e) > 2 and e[0] == e[-1] and e[0] in "\"*")))
box = st.tuples(*[st.integers(0, 2000)] * 4).map(lambda b: tuple(float(v) for v in b))
triple = st.builds(Triple, entity, st.sampled_from(TYPES), st.one_of(st.none(), st.lists(box, min_size=1, max_size=3)
                                                                     .map(tuple)))


@settings(max_examples=300, deadline=None)
@given(st.lists(triple, max_size=6))
def test_format_parse_round_trip(triples):
    got = parse_answer(format_turn("because", format_answer(triples)))
    assert got.status == "ok", (format_answer(triples), got)
    assert same_triples(got.triples, triples)


def test_prose_read_past_is_listed_as_skipped():
    got = read("Entities found:\nObama|PER|None\nThat is all.")
    assert got.ok and got.triples == [Triple("Obama", "PER", None)]
    assert got.skipped == ["Entities found:", "That is all."]
    assert read("```\nObama|PER|None\n``` bye").skipped == ["bye"]
    assert read("Answer: Obama|PER|None").skipped == []  # a lead-in is understood, not skipped


@pytest.mark.parametrize("text,boxes", [
    ("[1,2,3,4]", [(1, 2, 3, 4)]), ("[ 1 , 2 ,3 4 ]", [(1, 2, 3, 4)]), ("(1,2,3,4)", [(1, 2, 3, 4)]),
    ("(1, 2) , (3, 4)", [(1, 2, 3, 4)]), ("(1,2)(3,4)", [(1, 2, 3, 4)]), ("[-1.5,2e1,3,+4]", [(-1.5, 20, 3, 4)]),
    ("[1,2,3,4],[5,6,7,8]", [(1, 2, 3, 4), (5, 6, 7, 8)]), ("[1,2,3,4]; [5,6,7,8]", [(1, 2, 3, 4), (5, 6, 7, 8)]),
    ("[[1,2,3,4] [5,6,7,8]]", [(1, 2, 3, 4), (5, 6, 7, 8)]), ("[(1,2),(3,4)]", [(1, 2, 3, 4)]),
    ("[1,2,3]", None), ("[1,,2,3,4]", None), ("[1-2,3,4]", None), ("[[1,2,3,4]", None), ("[1,2,3,4]]", None),
    ("[1,2,3,4],", None), ("[1,2,3,4px]", None), ("1,2,3,4", None), ("", None), ("[1e999,2,3,4]", None),
])
def test_box_scanner(text, boxes):
    got, why = scan_boxes(text)
    assert got == (None if boxes is None else tuple(tuple(float(v) for v in b) for b in boxes))
    assert (why is None) == (boxes is not None)
