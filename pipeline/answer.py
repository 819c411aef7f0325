"""The E2E-GMNER answer format, written and parsed in this one place.

An answer is a list of records ``entity|TYPE|[x1,y1,x2,y2]`` or ``entity|TYPE|None`` joined by ``"; "``, or the single
word ``None`` when the sentence has no entity. An entity with several gold boxes lists them all:
``entity|TYPE|[x1,y1,x2,y2],[x1,y1,x2,y2]``. Boxes are integer pixels of the original image. The assistant turn is
``<think>...</think><answer>...</answer>``.

``parse_answer`` never raises on model output: it returns the triples plus a ``ParseStatus`` telling whether the text
was fully understood (``ok``), understood in part (``partial``: some segments were skipped), or not at all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Triple:
    entity: str
    type: str
    boxes: tuple[Box, ...] | None  # None: not visible (no box)

    @property
    def visible(self) -> bool:
        return self.boxes is not None


@dataclass
class ParsedAnswer:
    triples: list[Triple]
    status: str  # "ok" | "partial" | "empty" (no answer text) | "unparsable"
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


NO_ENTITY = "None"
RECORD_SEP = "; "

_ANSWER_TAG = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.S | re.I)
_THINK_TAG = re.compile(r"<think>(.*?)(?:</think>|$)", re.S | re.I)
_NUM = r"-?\d+(?:\.\d+)?"
_BOX = rf"\[\s*{_NUM}\s*,\s*{_NUM}\s*,\s*{_NUM}\s*,\s*{_NUM}\s*\]"
_RECORD = re.compile(
    rf"(?P<entity>[^;|]+(?:\|[^;|]+)*?)\s*\|\s*(?P<type>[A-Za-z][A-Za-z_\-]*)\s*\|\s*"
    rf"(?P<loc>None|{_BOX}(?:\s*,\s*{_BOX})*)\s*(?=;|$)",
    re.S,
)
_BOX_RE = re.compile(_BOX)
_NUMS = re.compile(_NUM)


def format_box(box: Sequence[float]) -> str:
    return "[" + ",".join(str(int(round(v))) for v in box) + "]"


def format_triple(t: Triple) -> str:
    loc = NO_ENTITY if t.boxes is None else ",".join(format_box(b) for b in t.boxes)
    return f"{t.entity}|{t.type}|{loc}"


def format_answer(triples: Iterable[Triple]) -> str:
    triples = list(triples)
    if not triples:
        return NO_ENTITY
    return RECORD_SEP.join(format_triple(t) for t in triples)


def format_turn(think: str, answer: str) -> str:
    return f"<think>{think}</think><answer>{answer}</answer>"


def extract_answer(text: str) -> str:
    """The text inside <answer> tags, or the whole text when it has no tags."""
    m = _ANSWER_TAG.search(text)
    return (m.group(1) if m else text).strip()


def extract_think(text: str) -> str | None:
    m = _THINK_TAG.search(text)
    return m.group(1).strip() if m else None


def parse_answer(text: str | None) -> ParsedAnswer:
    """Parse an answer string (with or without tags). Never raises."""
    if text is None:
        return ParsedAnswer([], "empty", ["no text"])
    body = extract_answer(str(text))
    if not body:
        return ParsedAnswer([], "empty", ["empty answer"])
    if body.strip().rstrip(".;") == NO_ENTITY:
        return ParsedAnswer([], "ok")
    triples: list[Triple] = []
    errors: list[str] = []
    pos = 0
    for m in _RECORD.finditer(body):
        skipped = body[pos:m.start()].strip().strip(";").strip()
        if skipped:
            errors.append(f"could not read {skipped[:80]!r}")
        pos = m.end()
        loc = m.group("loc")
        boxes = None if loc == NO_ENTITY else tuple(
            tuple(float(v) for v in _NUMS.findall(b)) for b in _BOX_RE.findall(loc)  # type: ignore[misc]
        )
        triples.append(Triple(m.group("entity").strip(), m.group("type").strip(), boxes))
    rest = body[pos:].strip().strip(";").strip()
    if rest:
        errors.append(f"could not read {rest[:80]!r}")
    if not triples:
        return ParsedAnswer([], "unparsable", errors or ["no entity record found"])
    return ParsedAnswer(triples, "partial" if errors else "ok", errors)


def gold_triples(record: dict[str, Any]) -> list[Triple]:
    """The gold triples of a record, in entity order. Visibility is only meaningful when grounding_labels is present."""
    out = []
    for ent in record.get("entities") or []:
        boxes = ent.get("boxes") or []
        out.append(Triple(ent["text"], ent["type"], tuple(tuple(float(v) for v in b) for b in boxes) or None))
    return out


def same_triples(a: Iterable[Triple], b: Iterable[Triple]) -> bool:
    """Multiset equality with boxes compared at integer-pixel precision (the answer format's precision)."""

    def norm(t: Triple) -> tuple:
        boxes = None if t.boxes is None else tuple(sorted(tuple(int(round(v)) for v in box) for box in t.boxes))
        return (t.entity, t.type, boxes)

    return sorted(map(norm, a), key=repr) == sorted(map(norm, b), key=repr)
