"""The E2E-GMNER answer format, written and parsed in this one place.

An answer is a list of records ``entity|TYPE|[x1,y1,x2,y2]`` or ``entity|TYPE|None`` joined by ``"; "``, or the single
word ``None`` when the sentence has no entity. An entity with several gold boxes lists them all:
``entity|TYPE|[x1,y1,x2,y2],[x1,y1,x2,y2]``. Boxes are integer pixels of the original image. The assistant turn is
``<think>...</think><answer>...</answer>``.

``parse_answer`` never raises on model output, and its time is linear in the length of the text: tags are found by one
pass over the text, boxes are read by a small scanner (no regular expression here can split the same characters in
more than one way), and an answer longer than ``max_chars`` is not read at all (``unparsable``, with the reason).
Besides the canonical format it reads the variants teachers and policies produce when their meaning is clear:
full-width separators (｜ ； ［ ］ ，), the look-alike bars ``│ 丨 ∣`` (as E2E-GMNER's parser does; ``lookalike_bars``),
extra whitespace, several boxes for one entity (``[..],[..]``, ``[[..],[..]]``, or a box-only segment after ``;``),
``None``/``null``/``[]`` for "no entity" or "no box", boxes written ``(x1,y1,x2,y2)`` or ``(x1,y1),(x2,y2)``, records
on separate lines or in a numbered list, a lead-in such as ``Answer:``, prose lines before or after the records, the
location field in any position, and JSON (or Python-literal) lists of objects or of ``[entity, type, location]``
lists. It returns the triples plus a status:

* ``ok``: everything that looks like an answer was understood (``notes`` lists the tolerated deviations; ``skipped``
  holds any prose that was read past, e.g. a line after the records);
* ``partial``: some triples were read, some text was not (``errors`` says what);
* ``unparsable``: nothing was read, ``empty``: there was no answer text at all.

``check_turn_format`` is the strict check of the whole assistant turn that rewards use (tags present, closed, in
order, a non-empty ``<think>``, nothing but whitespace outside them); the parser itself stays tolerant.

Every number read from outside data (a box in an answer, a JSON value, a gold column) goes through ``coordinate``:
anything that is not a finite float (a 400-digit integer, ``1e999``, ``NaN``) is an error on that box, never an
exception.
"""

from __future__ import annotations

import ast
import json
import math
import re
import reprlib
from dataclasses import dataclass, field
from typing import Any, Collection, Iterable, Sequence

Box = tuple[float, float, float, float]

# The Twitter-GMNER label set: the one default of the student prompt, the rewards (grpo_filter, the trainer) and
# ``gmner-pipeline eval``, so that training and evaluation read the same answer the same way.
DEFAULT_TYPES: tuple[str, ...] = ("PER", "LOC", "ORG", "OTHER")
# Answers longer than this are not read (unparsable). The longest Twitter-GMNER v2.0 gold answer is 624 characters.
MAX_ANSWER_CHARS = 16_384


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
    notes: list[str] = field(default_factory=list)  # deviations from the canonical format that were tolerated
    skipped: list[str] = field(default_factory=list)  # prose read past without being understood (status stays ok)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


NO_ENTITY = "None"
RECORD_SEP = "; "
PARSE_STATUSES = ("ok", "partial", "unparsable", "empty")

# Full-width (CJK) punctuation that teachers emit in place of the format's ASCII separators.
_FULLWIDTH = {"｜": "|", "；": ";", "［": "[", "］": "]", "，": ",", "（": "(", "）": ")", "：": ":", "　": " ",
              "、": ",", "【": "[", "】": "]", **{chr(0xFF10 + d): str(d) for d in range(10)}}
# Bars that look like '|': box drawing U+2502, CJK U+4E28, "divides" U+2223 (E2E-GMNER's parser reads them as '|').
LOOKALIKE_BARS = "│丨∣"
_TRANSLATE = str.maketrans(_FULLWIDTH)
_TRANSLATE_BARS = str.maketrans({**_FULLWIDTH, **{c: "|" for c in LOOKALIKE_BARS}})

# Every pattern below is linear: literal alternatives, or one quantified class followed by something it cannot match.
_TAG = re.compile(r"<(/?)(answer|think)>", re.I)
_NONE_LOC = re.compile(r"(?:none|null|nil|n/?a|nan|no box|not visible|\[\s*\]|\(\s*\)|-)", re.I)
_NO_ENTITY = re.compile(r"(?:none|null|\[\s*\]|no entit(?:y|ies)(?: found)?|there (?:is|are) no entit(?:y|ies))\.?",
                        re.I)
_LEAD_IN = re.compile(r"\s*(?:the\s+)?(?:final\s+)?(?:answer|output|result|prediction|entities|triples)s?"
                      r"(?:\s+(?:is|are))?\s*:\s*", re.I)
_LIST_MARKER = re.compile(r"\s*(?:\d+[.)]|[-*•])\s+")
_FENCE_LANG = re.compile(r"(?:[a-zA-Z]*[ \t]*\n)?\s*")  # a language name only when a line break follows
_QUOTES = "\"'`*“”‘’"
_COMMA_AFTER_LOCATION = re.compile(r"(?:(?<=[\])])|(?<=None)|(?<=none)|(?<=null))\s*,\s*(?=[^\s\[(,])")
_SPECIAL_TOKENS = re.compile(r"<\|[a-z_]+\|>")  # Qwen-VL markup such as <|box_start|> ... <|box_end|>
_STRUCTURED_LINE = re.compile(r"^[ \t]*[\[{]", re.M)
# Box tokens: a whitespace run, a number, or one bracket / separator. Each token has one reading.
_BOX_TOKEN = re.compile(r"(\s+)|([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)|([\[\](),;])")

_ENTITY_KEYS = ("entity", "entity_name", "name", "text", "span", "mention", "entity_text")
_TYPE_KEYS = ("type", "entity_type", "label", "category", "class", "tag")
_LOC_KEYS = ("location", "loc", "box", "boxes", "bbox", "bbox_2d", "bboxes", "region", "grounding", "bounding_box")
_MAX_LOCATION_DEPTH = 3  # [[[[x1, y1, x2, y2]]]] at most: deeper nesting is not a location

_preview_repr = reprlib.Repr()
_preview_repr.maxstring = _preview_repr.maxother = 80
_preview_repr.maxlevel = 3


def preview(value: Any, limit: int = 80) -> str:
    """A short repr for messages, safe on huge or deeply nested values (reprlib limits size and depth)."""
    try:
        text = value if isinstance(value, str) else _preview_repr.repr(value)
    except Exception:  # noqa: BLE001 - e.g. an int beyond the interpreter's digit limit
        text = f"<{type(value).__name__}>"
    return repr(text[:limit])


# --- numbers ---------------------------------------------------------------------------------------------------------

def coordinate(value: Any) -> float | None:
    """A box coordinate from outside data as a finite float, or None: bools, text that is not a number, NaN,
    infinities and integers too large for a float (a 400-digit number) are not coordinates."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


# --- writing ---------------------------------------------------------------------------------------------------------

def format_box(box: Sequence[float]) -> str:
    """``[x1,y1,x2,y2]`` in whole numbers: how every box is written in answers, chains and prompts (the one writer)."""
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


# --- tags (one pass over the text) -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Tag:
    start: int
    end: int
    name: str  # "answer" | "think"
    closing: bool


def _tags(text: str) -> list[_Tag]:
    return [_Tag(m.start(), m.end(), m.group(2).lower(), bool(m.group(1))) for m in _TAG.finditer(text)]


def _next_closing(tags: list[_Tag], name: str) -> list[int | None]:
    """For each tag index i, the index of the first closing ``name`` tag at or after i (None: there is none)."""
    out: list[int | None] = [None] * (len(tags) + 1)
    for i in range(len(tags) - 1, -1, -1):
        out[i] = i if tags[i].closing and tags[i].name == name else out[i + 1]
    return out


def _blocks(tags: list[_Tag], name: str) -> list[tuple[_Tag, _Tag]]:
    """The ``<name>...</name>`` blocks, each opening tag paired with the FIRST closing tag after it, left to right
    (what a non-greedy ``<name>.*?</name>`` finds), in one pass."""
    nxt = _next_closing(tags, name)
    out = []
    i = 0
    while i < len(tags):
        t = tags[i]
        if t.name == name and not t.closing:
            j = nxt[i + 1]
            if j is None:  # no closing tag after this one, hence none after any later opening tag either
                break
            out.append((t, tags[j]))
            i = j + 1
        else:
            i += 1
    return out


def _cut(text: str, spans: Iterable[tuple[int, int]]) -> str:
    parts, pos = [], 0
    for start, end in spans:
        parts.append(text[pos:start])
        pos = end
    parts.append(text[pos:])
    return "".join(parts)


@dataclass(frozen=True)
class _Split:
    answer: str
    answer_blocks: int  # complete <answer> blocks outside <think> blocks


def _split_turn(text: str) -> _Split:
    # an "<answer>" mentioned while thinking is not the answer: closed <think> blocks go first
    outside = _cut(text, ((a.start, b.end) for a, b in _blocks(_tags(text), "think")))
    tags = _tags(outside)
    blocks = _blocks(tags, "answer")
    if blocks:
        a, b = blocks[-1]
        return _Split(outside[a.end:b.start].strip(), len(blocks))
    opening = next((t for t in tags if t.name == "answer" and not t.closing), None)
    if opening is not None:
        return _Split(outside[opening.end:].strip(), 0)
    think = next((t for t in tags if t.name == "think" and not t.closing), None)  # unclosed: runs to the end
    return _Split((outside if think is None else outside[:think.start]).strip(), 0)


def extract_answer(text: str) -> str:
    """The text inside the last complete ``<answer>`` block (or after an unclosed ``<answer>``); without answer tags,
    the text with any ``<think>`` block removed."""
    return _split_turn(text).answer


def extract_think(text: str) -> str | None:
    """The text of the first ``<think>`` block (to its ``</think>``, or to the end when unclosed)."""
    tags = _tags(text)
    start = next((i for i, t in enumerate(tags) if t.name == "think" and not t.closing), None)
    if start is None:
        return None
    end = next((t for t in tags[start + 1:] if t.name == "think" and t.closing), None)
    return text[tags[start].end:end.start if end else len(text)].strip()


def check_turn_format(text: str | None) -> str | None:
    """The strict format of an assistant turn: None when it is exactly ``<think>…</think><answer>…</answer>`` (tags
    written in lower case, each once, in that order, a non-empty ``<think>``, nothing but whitespace outside the
    tags), else what is wrong. Rewards use it as the format component; the parser does not need it."""
    if not text:
        return "no text"
    tags = _tags(text)
    kinds = [("/" if t.closing else "") + t.name for t in tags]
    for name in ("think", "answer"):
        if name not in kinds:
            return f"no <{name}> tag"
        if "/" + name not in kinds:
            return f"unclosed <{name}>"
    if kinds != ["think", "/think", "answer", "/answer"]:
        return f"tags repeated or out of order: {' '.join(f'<{k}>' for k in kinds[:8])}"
    if any(text[t.start:t.end] != f"<{kinds[i]}>" for i, t in enumerate(tags)):
        return "tags must be written in lower case"
    think_open, think_close, answer_open, answer_close = tags
    if text[:think_open.start].strip() or text[think_close.end:answer_open.start].strip() \
            or text[answer_close.end:].strip():
        return "text outside the <think> and <answer> blocks"
    if not text[think_open.end:think_close.start].strip():
        return "empty <think>"
    return None


# --- parsing ---------------------------------------------------------------------------------------------------------

def parse_answer(text: str | None, types: Collection[str] | None = None, *, max_chars: int | None = MAX_ANSWER_CHARS,
                 lookalike_bars: bool = True) -> ParsedAnswer:
    """Parse a model answer (with or without tags) into triples. Never raises on model output; linear time.

    ``types``: the label set, when known. Types are then matched case-insensitively and written in the set's
    spelling, and an entity/type pair written in the wrong order (``PER|Obama|None``) is put right.
    ``max_chars``: an answer (the text inside the answer tags) longer than this is ``unparsable`` (None: no limit).
    ``lookalike_bars``: read ``│ 丨 ∣`` as ``|`` (E2E-GMNER's parser does).
    """
    try:
        return _parse(text, types, max_chars, lookalike_bars)
    except Exception as exc:  # a parser bug must not kill a training step or a stage: report it as unparsable
        return ParsedAnswer([], "unparsable", [f"parser error {type(exc).__name__}: {exc}"])


def _parse(text: str | None, types: Collection[str] | None, max_chars: int | None,
           lookalike_bars: bool) -> ParsedAnswer:
    if text is None:
        return ParsedAnswer([], "empty", ["no text"])
    text = str(text)
    notes: list[str] = []
    skipped: list[str] = []
    split = _split_turn(text)
    if split.answer_blocks > 1:
        notes.append("several <answer> blocks: read the last")
    body = split.answer
    if max_chars is not None and len(body) > max_chars:
        return ParsedAnswer([], "unparsable", [f"the answer has {len(body)} characters, more than the limit of "
                                               f"{max_chars}: not read (max_chars sets the limit)"], notes)
    if lookalike_bars and any(c in body for c in LOOKALIKE_BARS):
        notes.append(f"read the look-alike bars {LOOKALIKE_BARS!r} as '|'")
    body = _SPECIAL_TOKENS.sub("", body.translate(_TRANSLATE_BARS if lookalike_bars else _TRANSLATE))
    fenced = _code_fence(body)
    if fenced is not None:
        body, outside = fenced
        notes.append("read the answer inside a code fence")
        skipped += [s for s in outside if s]
    body = body.strip()
    if not body:
        return ParsedAnswer([], "empty", ["empty answer"], notes, skipped)
    lead = _LEAD_IN.match(body)
    if lead:
        body = body[lead.end():].strip()
        notes.append(f"skipped lead-in {lead.group(0).strip()!r}")
    if _NO_ENTITY.fullmatch(body.strip().strip(_QUOTES).strip()):
        return _finish([], [], [], notes, skipped)
    typemap = {t.lower(): t for t in types} if types else None
    if body[0] in "[{":
        value = _load_structured(body)
        if value is not None:
            return _finish(*_from_structured(value, typemap), notes, skipped)
    elif "|" not in body:
        value, around = _structured_after_prose(body)
        if value is not None:
            notes += [f"skipped text {preview(s)}" for s in around]
            return _finish(*_from_structured(value, typemap), notes, skipped + around)
    triples, errors, notes_here, prose = _from_pipes(body, typemap)
    return _finish(triples, errors, notes_here, notes, skipped + prose)


def _finish(triples: list[Triple], errors: list[str], notes_here: list[str], notes: list[str],
            skipped: list[str]) -> ParsedAnswer:
    notes = notes + notes_here
    if not triples:  # an empty structured list ({"entities": []}) is a clear "no entity"
        return ParsedAnswer([], "unparsable" if errors else "ok", errors, notes, skipped)
    return ParsedAnswer(triples, "partial" if errors else "ok", errors, notes, skipped)


def _code_fence(body: str) -> tuple[str, list[str]] | None:
    """The text inside the first ```` ``` ```` fence that is closed (and the text around it), found with two
    ``find`` calls instead of a non-greedy pattern that would rescan the rest of the text from every fence."""
    start = body.find("```")
    if start < 0:
        return None
    inner = _FENCE_LANG.match(body, start + 3).end()  # a language name and the line break after the opening fence
    end = body.find("```", inner)
    if end < 0:
        return None
    return body[inner:end], [body[:start].strip(), body[end + 3:].strip()]


# --- boxes (a scanner: linear, one reading per text) -----------------------------------------------------------------

@dataclass(frozen=True)
class _Token:
    kind: str  # "num" or one of "[ ] ( ) , ;"
    text: str
    space_before: bool


class _NotBoxes(Exception):
    pass


def _box_tokens(text: str) -> list[_Token] | None:
    tokens: list[_Token] = []
    pos, space = 0, False
    while pos < len(text):
        m = _BOX_TOKEN.match(text, pos)
        if m is None:
            return None  # a character that no box syntax has
        if m.group(1):
            space = True
        else:
            tokens.append(_Token("num" if m.group(2) else m.group(3), m.group(0), space))
            space = False
        pos = m.end()
    return tokens


def scan_boxes(text: str) -> tuple[tuple[Box, ...] | None, str | None]:
    """Read a box list written in the pipe format's box syntax: ``[x1,y1,x2,y2]`` (numbers separated by a comma or
    whitespace), ``(x1,y1,x2,y2)``, ``(x1,y1),(x2,y2)``, several of them separated by nothing, whitespace, ``,`` or
    ``;``, optionally inside one outer ``[ ]``. Returns (boxes, None), or (None, why not) when the WHOLE text is not
    such a list. Every token is read once: the time is linear in the text."""
    tokens = _box_tokens(text)
    if not tokens:
        return None, "not a box"
    try:
        boxes, i = _box_list(tokens)
    except _NotBoxes as exc:
        return None, str(exc) or "not a box"
    if i != len(tokens):
        return None, "not a box"
    return boxes, None


def _box_list(tokens: list[_Token]) -> tuple[tuple[Box, ...], int]:
    n = len(tokens)
    outer = tokens[0].kind == "[" and n > 1 and tokens[1].kind in "[("
    i = 1 if outer else 0
    boxes: list[Box] = []
    while True:
        box, i = _one_box(tokens, i)
        boxes.append(box)
        if i < n and tokens[i].kind in ",;":
            i += 1
            continue
        if i < n and tokens[i].kind in "[(":
            continue
        break
    if outer:
        if i >= n or tokens[i].kind != "]":
            raise _NotBoxes("unbalanced brackets")
        i += 1
    return tuple(boxes), i


_CLOSING = {"[": "]", "(": ")"}


def _one_box(tokens: list[_Token], i: int) -> tuple[Box, int]:
    if i >= len(tokens) or tokens[i].kind not in _CLOSING:
        raise _NotBoxes()
    close = _CLOSING[tokens[i].kind]
    numbers, i = _numbers(tokens, i + 1)
    i = _expect(tokens, i, close)
    if close == ")" and len(numbers) == 2:  # (x1,y1),(x2,y2)
        if i < len(tokens) and tokens[i].kind == ",":
            i += 1
        i = _expect(tokens, i, "(")
        second, i = _numbers(tokens, i)
        i = _expect(tokens, i, ")")
        if len(second) != 2:
            raise _NotBoxes()
        numbers += second
    if len(numbers) != 4:
        raise _NotBoxes(f"a box needs 4 numbers, got {len(numbers)}")
    return tuple(numbers), i  # type: ignore[return-value]


def _expect(tokens: list[_Token], i: int, kind: str) -> int:
    if i >= len(tokens) or tokens[i].kind != kind:
        raise _NotBoxes()
    return i + 1


def _numbers(tokens: list[_Token], i: int) -> tuple[list[float], int]:
    """Numbers separated by one comma or by whitespace."""
    out: list[float] = []
    while True:
        if i >= len(tokens) or tokens[i].kind != "num":
            raise _NotBoxes()
        value = coordinate(tokens[i].text)
        if value is None:
            raise _NotBoxes(f"coordinate {preview(tokens[i].text, 40)} is not a finite number")
        out.append(value)
        i += 1
        if i < len(tokens) and tokens[i].kind == ",":
            i += 1
        elif not (i < len(tokens) and tokens[i].kind == "num" and tokens[i].space_before):
            return out, i


# --- the pipe format -------------------------------------------------------------------------------------------------

def _from_pipes(body: str, typemap: dict[str, str] | None
                ) -> tuple[list[Triple], list[str], list[str], list[str]]:
    triples: list[Triple] = []
    errors: list[str] = []
    notes: list[str] = []
    skipped: list[str] = []
    extra_boxes: dict[int, list[Box]] = {}  # boxes of box-only segments, by triple index (added once, at the end)
    lines = [ln for ln in body.splitlines() if ln.strip()]
    numbered = len(lines) > 1 and all(_LIST_MARKER.match(ln) for ln in lines if "|" in ln)
    pending_prose: list[str] = []  # lines without any '|' seen since the last record
    for line in lines:
        if numbered:
            marker = _LIST_MARKER.match(line)
            if marker:
                line = line[marker.end():]
        lead = _LEAD_IN.match(line)
        if lead and "|" in line:
            line = line[lead.end():]
        if "|" not in line and not (triples and _is_box_list(line.strip().strip(";,. "))):
            pending_prose.append(line.strip())
            continue
        if pending_prose:
            if triples:
                errors.append(_skipped(pending_prose))
            else:
                notes.append(_skipped(pending_prose))
                skipped.append("\n".join(pending_prose))
            pending_prose = []
        for segment in _segments(line):
            _read_segment(segment, triples, errors, notes, typemap, extra_boxes)
    if pending_prose:
        if triples:
            notes.append(_skipped(pending_prose))
            skipped.append("\n".join(pending_prose))
        else:
            errors.append(_skipped(pending_prose))
    for i, boxes in extra_boxes.items():
        t = triples[i]
        triples[i] = Triple(t.entity, t.type, (t.boxes or ()) + tuple(boxes))
    if not triples and not errors:
        errors.append("no entity record found")
    return triples, errors, notes, skipped


def _skipped(lines: list[str]) -> str:
    return f"skipped text {preview(' / '.join(line[:80] for line in lines[:3]))}"


def _is_box_list(text: str) -> bool:
    return scan_boxes(text)[0] is not None


def _segments(line: str) -> list[str]:
    """Split one line at ';' into record segments, re-joining pieces of an entity that itself contains ';'
    (Twitter text has entities such as ``Fox &amp ; Fin Financial Group``)."""
    out: list[str] = []
    carry: list[str] = []  # pieces of an entity fragment that continues after a ';' (joined once: linear)
    for piece in line.split(";"):
        if carry:
            carry.append(piece)
            if "|" in piece:
                out.append(";".join(carry))
                carry = []
            continue
        stripped = piece.strip()
        if not stripped:
            continue
        if "|" not in piece and not _is_box_list(stripped.strip(",. ")):
            carry = [piece]
            continue
        out.append(piece)
    if carry:
        out.append(";".join(carry))
    return out


def _read_segment(segment: str, triples: list[Triple], errors: list[str], notes: list[str],
                  typemap: dict[str, str] | None, extra_boxes: dict[int, list[Box]]) -> None:
    seg = segment.strip().rstrip(",").rstrip()
    if seg.endswith(".") and not seg.endswith(".."):
        seg = seg[:-1].rstrip()
    if not seg:
        return
    if "|" not in seg:
        boxes, _ = scan_boxes(seg)
        last = triples[-1] if triples else None
        if boxes and last is not None and last.boxes is not None:  # "A|PER|[..]; [..]": a second box of A
            if len(triples) - 1 not in extra_boxes:
                notes.append(f"box-only segment {preview(seg, 40)} joined to {preview(last.entity, 40)}")
            extra_boxes.setdefault(len(triples) - 1, []).extend(boxes)
        else:
            errors.append(f"could not read {preview(seg)}")
        return
    fields = [f.strip() for f in seg.split("|")]
    if len(fields) > 3:
        pieces = _COMMA_AFTER_LOCATION.split(seg)
        if len(pieces) > 1 and all(p.count("|") == 2 for p in pieces):  # "A|PER|None, B|LOC|[..]"
            notes.append(f"records separated by ',' in {preview(seg, 40)}")
            for piece in pieces:
                _read_segment(piece, triples, errors, notes, typemap, extra_boxes)
            return
    if len(fields) != 3:
        errors.append(f"could not read {preview(seg)}: expected entity|TYPE|location, found {len(fields)} fields")
        return
    locations = [_location(f) for f in fields]
    locs = [i for i, (is_loc, _, _) in enumerate(locations) if is_loc]
    if len(locs) > 1 and 2 in locs:
        locs = [2]
    if len(locs) != 1:
        why = locations[2][2]
        detail = f" ({why})" if why and why != "not a box" else ""
        errors.append(f"could not read {preview(seg)}: no location (a box [x1,y1,x2,y2] or None) in it{detail}")
        return
    loc_index = locs[0]
    if loc_index != 2:
        notes.append(f"location in field {loc_index + 1} of {preview(seg, 40)}")
    rest = [f for i, f in enumerate(fields) if i != loc_index]
    triple = _make_triple(rest[0], rest[1], locations[loc_index][1], typemap, notes)
    if triple is None:
        errors.append(f"could not read {preview(seg)}: empty entity or type")
    else:
        triples.append(triple)


def _location(text: str) -> tuple[bool, tuple[Box, ...] | None, str | None]:
    """(is a location, its boxes or None for "no box", why it is not a location)."""
    t = text.strip().strip(_QUOTES).strip()
    if _NONE_LOC.fullmatch(t):
        return True, None, None
    boxes, why = scan_boxes(t)
    return boxes is not None, boxes, why


_PAIRS = {'"': '"', "'": "'", "`": "`", "*": "*", "“": "”", "‘": "’"}


def _clean(text: str) -> str:
    """Collapse whitespace and remove quotes or markdown emphasis wrapped around the WHOLE field (``"Obama"``,
    ``**Obama**``); an unpaired mark is text (a Twitter entity can start with ``*``). Indexes, not copies: linear."""
    text = " ".join(str(text).split())
    i, j = 0, len(text)
    while j - i > 2 and _PAIRS.get(text[i]) == text[j - 1]:
        i, j = i + 1, j - 1
        while i < j and text[i].isspace():
            i += 1
        while j > i and text[j - 1].isspace():
            j -= 1
    return text[i:j]


def _make_triple(entity: str, type_: str, boxes: tuple[Box, ...] | None, typemap: dict[str, str] | None,
                 notes: list[str]) -> Triple | None:
    entity, type_ = _clean(entity), _clean(type_)
    if typemap is not None:
        if type_.lower() not in typemap and entity.lower() in typemap:
            entity, type_ = type_, entity
            notes.append(f"type and entity swapped in {preview(type_ + '|' + entity, 60)}")
        type_ = typemap.get(type_.lower(), type_)
    if not entity or not type_:
        return None
    return Triple(entity, type_, boxes or None)


# --- JSON / Python-literal answers -----------------------------------------------------------------------------------

def _load_structured(body: str) -> Any:
    for loader in (json.loads, ast.literal_eval):
        try:
            return loader(body)
        except Exception:  # noqa: BLE001 - any failure (also too deep, too many digits) means "not this format"
            continue
    return None


def parse_json_object(text: str | None, *, max_chars: int | None = MAX_ANSWER_CHARS) -> tuple[dict[str, Any] | None,
                                                                                        list[str]]:
    """A JSON object from a model's text, for answers that are objects rather than GMNER triples (the knowledge
    stage's generators and voter), tolerating what models wrap around it: a ``<think>`` block, an ``<answer>`` tag,
    a code fence, prose before or after it, a Python-literal dict. Returns ``(object or None, notes)``; never raises,
    and a text longer than ``max_chars`` is not read."""
    try:
        return _json_object(text, max_chars)
    except Exception as exc:  # noqa: BLE001 - a parser bug must not kill a stage: report it as unreadable
        return None, [f"parser error {type(exc).__name__}: {exc}"]


def close_json(text: str) -> str:
    """A JSON object cut off mid-way (a model that hit ``max_tokens``) closed so that it parses. A value string cut
    mid-way is closed and kept; anything after the last complete value (a cut key, a dangling ``:`` or ``,``) is
    dropped; open brackets are closed. One pass over the text; the text before the cut is kept as is."""
    start = text.find("{")
    if start < 0:
        return text
    body = text[start:]
    closers: list[str] = []  # what closes each open container
    expect: list[str] = []  # per container: "key" | "colon" | "value" | "after" (a value just ended)
    in_string = escaped = is_key = False
    safe_end, safe_closers = 0, ""
    for i, ch in enumerate(body):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
                if is_key:
                    expect[-1] = "colon"
                elif expect:
                    expect[-1] = "after"
                    safe_end, safe_closers = i + 1, "".join(reversed(closers))
            continue
        if ch == '"':
            in_string, is_key = True, bool(expect) and expect[-1] == "key"
        elif ch in "{[":
            closers.append("}" if ch == "{" else "]")
            expect.append("key" if ch == "{" else "value")
            safe_end, safe_closers = i + 1, "".join(reversed(closers))
        elif ch in "}]":
            if not closers:
                break
            closers.pop()
            expect.pop()
            if not closers:
                return body[:i + 1]
            expect[-1] = "after"
            safe_end, safe_closers = i + 1, "".join(reversed(closers))
        elif ch == ":" and expect:
            expect[-1] = "value"
        elif ch == "," and expect:
            expect[-1] = "key" if closers[-1] == "}" else "value"
        elif not ch.isspace() and expect and expect[-1] in ("value", "after"):  # a number, true, false or null
            expect[-1] = "after"
            safe_end, safe_closers = i + 1, "".join(reversed(closers))
    if in_string and not is_key:  # a value cut mid-sentence: keep what was written
        return (body[:-1] if escaped else body) + '"' + "".join(reversed(closers))
    return body[:safe_end] + safe_closers


def _load_object(body: str) -> Any:
    """JSON that may hold raw line breaks inside strings (some grammars let a model write them), else a literal."""
    try:
        return json.loads(body, strict=False)
    except Exception:  # noqa: BLE001 - any failure means "not JSON": try a Python literal
        return _load_structured(body)


def _json_object(text: str | None, max_chars: int | None) -> tuple[dict[str, Any] | None, list[str]]:
    if text is None:
        return None, ["no text"]
    notes: list[str] = []
    body = _split_turn(str(text)).answer
    if max_chars is not None and len(body) > max_chars:
        return None, [f"the answer has {len(body)} characters, more than the limit of {max_chars}: not read"]
    fenced = _code_fence(body)
    if fenced is not None:
        body = fenced[0]
        notes.append("read the object inside a code fence")
    body = body.strip()
    value = _load_object(body) if body.startswith("{") else None
    if value is None:
        start, end = body.find("{"), body.rfind("}")
        if 0 <= start < end:
            value = _load_object(body[start:end + 1])
            if value is not None:
                notes.append("skipped text around the object")
    if not isinstance(value, dict):
        return None, notes + ["no JSON object found"]
    return value, notes


def _structured_after_prose(body: str) -> tuple[Any, list[str]]:
    """A JSON/literal list or object that starts a line after some prose (``Here you go:\n[{...}]``)."""
    m = _STRUCTURED_LINE.search(body)
    if not m:
        return None, []
    candidate = body[m.start():]
    end = max(candidate.rfind("]"), candidate.rfind("}"))
    value = _load_structured(candidate[:end + 1]) if end >= 0 else None
    if value is None:
        return None, []
    return value, [s for s in (body[:m.start()].strip(), candidate[end + 1:].strip()) if s]


def _from_structured(value: Any, typemap: dict[str, str] | None) -> tuple[list[Triple], list[str], list[str]]:
    triples: list[Triple] = []
    errors: list[str] = []
    notes: list[str] = ["read a JSON/literal answer"]
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        if _pick({str(k).lower(): v for k, v in value.items()}, _ENTITY_KEYS) is not None:
            value = [value]
        elif len(lists) == 1:
            value = lists[0]
    if not isinstance(value, list):
        return [], [f"could not read a JSON {type(value).__name__} as a list of entities"], notes
    for item in value:
        triple, err = triple_from_obj(item, typemap, notes)
        if triple is not None:
            triples.append(triple)
        else:
            errors.append(err or f"could not read {preview(item)}")
    return triples, errors, notes


def triple_from_obj(item: Any, typemap: dict[str, str] | None = None,
                    notes: list[str] | None = None) -> tuple[Triple | None, str | None]:
    """One triple from a JSON object (``{"entity", "type", "boxes"|"box"|"bbox_2d"|...}``) or a 3-item list.
    Never raises: anything unreadable (a missing key, a non-finite coordinate) is the returned error."""
    notes = notes if notes is not None else []
    if isinstance(item, dict):
        low = {str(k).lower(): v for k, v in item.items()}
        entity, type_ = _pick(low, _ENTITY_KEYS), _pick(low, _TYPE_KEYS)
        loc_key = next((k for k in _LOC_KEYS if k in low), None)
        if entity is None or type_ is None:
            return None, f"could not read {preview(item)}: no entity or type key"
        if loc_key is None:
            notes.append(f"no location key for {preview(entity, 40)}: read as None")
            loc: Any = None
        else:
            loc = low[loc_key]
    elif isinstance(item, (list, tuple)) and len(item) == 3:
        locs = [i for i, v in enumerate(item) if _value_is_location(v)]
        loc_index = 2 if 2 in locs or not locs else locs[0]
        rest = [v for i, v in enumerate(item) if i != loc_index]
        entity, type_, loc = rest[0], rest[1], item[loc_index]
    else:
        return None, f"could not read {preview(item)}: not an object or an [entity, type, location] list"
    if not isinstance(entity, str) or not isinstance(type_, str):
        return None, f"could not read {preview(item)}: entity and type must be text"
    boxes, err = boxes_from_value(loc)
    if err:
        return None, f"could not read the location of {preview(entity, 40)}: {err}"
    triple = _make_triple(entity, type_, boxes, typemap, notes)
    return (triple, None) if triple is not None else (None, f"could not read {preview(item)}: empty entity/type")


def _pick(obj: dict, keys: Sequence[str]) -> Any:
    for k in keys:
        if k in obj:
            return obj[k]
    return None


def _value_is_location(v: Any) -> bool:
    if v is None or (isinstance(v, (list, tuple)) and not isinstance(v, str)):
        return True
    return isinstance(v, str) and _location(v)[0]


def _number_like(v: Any) -> bool:
    """A number (finite or not: it is then an error on the box), or text that reads as a finite number."""
    if isinstance(v, str):
        return coordinate(v) is not None
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def boxes_from_value(loc: Any, _depth: int = 0) -> tuple[tuple[Box, ...] | None, str | None]:
    """A location value from JSON -> (boxes or None, error). Accepts None/"None"/[] (no box), one box of 4 numbers,
    a list of such boxes, a ``{"x1","y1","x2","y2"}`` object, or a string in the pipe format's box syntax. Every
    coordinate must be a finite number; nesting deeper than ``[[[box]]]`` is an error. Never raises."""
    if loc is None:
        return None, None
    if isinstance(loc, str):
        t = loc.strip().translate(_TRANSLATE)
        if not t or _NONE_LOC.fullmatch(t):
            return None, None
        boxes, why = scan_boxes(t)
        return (boxes, None) if boxes is not None else (None, f"{preview(loc, 40)} is not a box ({why})")
    if isinstance(loc, dict):
        low = {str(k).lower(): v for k, v in loc.items()}
        values = [coordinate(low.get(k)) for k in ("x1", "y1", "x2", "y2")]
        if any(v is None for v in values):
            return None, f"{preview(loc, 40)} is not a box (x1, y1, x2, y2: finite numbers)"
        return (tuple(values),), None  # type: ignore[return-value]
    if isinstance(loc, (list, tuple)):
        if not loc:
            return None, None
        if all(_number_like(v) for v in loc):  # one box: a flat list of numbers
            values = [coordinate(v) for v in loc]
            if any(v is None for v in values):
                return None, f"{preview(loc, 40)} is not a box (coordinates must be finite numbers)"
            if len(values) != 4:
                return None, f"a box needs 4 numbers, got {len(values)}"
            return (tuple(values),), None  # type: ignore[return-value]
        if _depth >= _MAX_LOCATION_DEPTH:
            return None, "boxes nested too deeply"
        boxes: list[Box] = []
        for b in loc:
            got, err = boxes_from_value(b, _depth + 1)
            if err:
                return None, err
            if got:
                boxes.extend(got)
        return (tuple(boxes) or None), None
    return None, f"{preview(loc, 40)} is not a box"


# --- gold and comparison ---------------------------------------------------------------------------------------------

def gold_triples(record: dict[str, Any]) -> list[Triple]:
    """The gold triples of a record, in entity order. Visibility is only meaningful when grounding_labels is present.
    Raises ValueError (with the entity) when a gold box is not four finite numbers."""
    out = []
    for ent in record.get("entities") or []:
        boxes = []
        for b in ent.get("boxes") or []:
            values = [coordinate(v) for v in b] if isinstance(b, (list, tuple)) else []
            if len(values) != 4 or any(v is None for v in values):
                raise ValueError(f"gold entity {preview(ent.get('text'), 40)}: box {preview(b, 60)} is not four "
                                 "finite numbers")
            boxes.append(tuple(values))
        out.append(Triple(ent["text"], ent["type"], tuple(boxes) or None))  # type: ignore[arg-type]
    return out


def same_triples(a: Iterable[Triple], b: Iterable[Triple]) -> bool:
    """Multiset equality with boxes compared at integer-pixel precision (the answer format's precision)."""

    def norm(t: Triple) -> tuple:
        boxes = None if t.boxes is None else tuple(sorted(tuple(int(round(v)) for v in box) for box in t.boxes))
        return (t.entity, t.type, boxes)

    return sorted(map(norm, a), key=repr) == sorted(map(norm, b), key=repr)
