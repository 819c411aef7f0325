"""The E2E-GMNER answer format, written and parsed in this one place.

An answer is a list of records ``entity|TYPE|[x1,y1,x2,y2]`` or ``entity|TYPE|None`` joined by ``"; "``, or the single
word ``None`` when the sentence has no entity. An entity with several gold boxes lists them all:
``entity|TYPE|[x1,y1,x2,y2],[x1,y1,x2,y2]``. Boxes are integer pixels of the original image. The assistant turn is
``<think>...</think><answer>...</answer>``.

``parse_answer`` never raises on model output. Besides the canonical format it reads the variants teachers and policies
produce when their meaning is clear: full-width separators (｜ ； ［ ］ ，), extra whitespace, several boxes for one
entity (``[..],[..]``, ``[[..],[..]]``, or a box-only segment after ``;``), ``None``/``null``/``[]`` for "no entity" or
"no box", boxes written ``(x1,y1,x2,y2)`` or ``(x1,y1),(x2,y2)``, records on separate lines or in a numbered list, a
lead-in such as ``Answer:``, prose lines before or after the records, the location field in any position, and JSON (or
Python-literal) lists of objects or of ``[entity, type, location]`` lists. It returns the triples plus a status:

* ``ok``: everything that looks like an answer was understood (``notes`` lists the tolerated deviations);
* ``partial``: some triples were read, some text was not (``errors`` says what);
* ``unparsable``: nothing was read, ``empty``: there was no answer text at all.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from typing import Any, Collection, Iterable, Sequence

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
    notes: list[str] = field(default_factory=list)  # deviations from the canonical format that were tolerated

    @property
    def ok(self) -> bool:
        return self.status == "ok"


NO_ENTITY = "None"
RECORD_SEP = "; "
PARSE_STATUSES = ("ok", "partial", "unparsable", "empty")

_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.S | re.I)
_ANSWER_OPEN = re.compile(r"<answer>(.*)$", re.S | re.I)
_THINK_TAG = re.compile(r"<think>(.*?)(?:</think>|$)", re.S | re.I)
_THINK_BLOCK = re.compile(r"<think>.*?(?:</think>|$)", re.S | re.I)
_THINK_CLOSED = re.compile(r"<think>.*?</think>", re.S | re.I)

# Full-width (CJK) punctuation that teachers emit in place of the format's ASCII separators.
_FULLWIDTH = str.maketrans({"｜": "|", "；": ";", "［": "[", "］": "]", "，": ",", "（": "(", "）": ")", "：": ":",
                            "　": " ", "、": ",", "【": "[", "】": "]", **{chr(0xFF10 + d): str(d) for d in range(10)}})

_NUM = r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?"
_SEP = r"\s*[,\s]\s*"
_BOX_ONE = (rf"(?:\[\s*{_NUM}{_SEP}{_NUM}{_SEP}{_NUM}{_SEP}{_NUM}\s*\]"
            rf"|\(\s*{_NUM}{_SEP}{_NUM}{_SEP}{_NUM}{_SEP}{_NUM}\s*\)"
            rf"|\(\s*{_NUM}\s*,\s*{_NUM}\s*\)\s*,?\s*\(\s*{_NUM}\s*,\s*{_NUM}\s*\))")
_BOXES_RE = re.compile(rf"\[?\s*{_BOX_ONE}(?:\s*[,;]?\s*{_BOX_ONE})*\s*\]?")
_BOX_ONE_RE = re.compile(_BOX_ONE)
_NUMS = re.compile(_NUM)
_NONE_LOC = re.compile(r"(?:none|null|nil|n/?a|nan|no box|not visible|\[\s*\]|\(\s*\)|-)", re.I)
_NO_ENTITY = re.compile(r"(?:none|null|\[\s*\]|no entit(?:y|ies)(?: found)?|there (?:is|are) no entit(?:y|ies))\.?",
                        re.I)
_LEAD_IN = re.compile(r"^\s*(?:the\s+)?(?:final\s+)?(?:answer|output|result|prediction|entities|triples)s?"
                      r"(?:\s+(?:is|are))?\s*:\s*", re.I)
_LIST_MARKER = re.compile(r"^\s*(?:\d+[.)]|[-*•])\s+")
_CODE_FENCE = re.compile(r"```[a-zA-Z]*\s*\n?(.*?)```", re.S)
_QUOTES = "\"'`*“”‘’"
_COMMA_AFTER_LOCATION = re.compile(r"(?:(?<=[\])])|(?<=None)|(?<=none)|(?<=null))\s*,\s*(?=[^\s\[(,])")
_SPECIAL_TOKENS = re.compile(r"<\|[a-z_]+\|>")  # Qwen-VL markup such as <|box_start|> ... <|box_end|>

_ENTITY_KEYS = ("entity", "entity_name", "name", "text", "span", "mention", "entity_text")
_TYPE_KEYS = ("type", "entity_type", "label", "category", "class", "tag")
_LOC_KEYS = ("location", "loc", "box", "boxes", "bbox", "bbox_2d", "bboxes", "region", "grounding", "bounding_box")


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


# --- reading ---------------------------------------------------------------------------------------------------------

def extract_answer(text: str) -> str:
    """The text inside the last complete ``<answer>`` block (or after an unclosed ``<answer>``); without answer tags,
    the text with any ``<think>`` block removed."""
    text = _THINK_CLOSED.sub("", text)  # an "<answer>" mentioned while thinking is not the answer
    blocks = _ANSWER_BLOCK.findall(text)
    if blocks:
        return blocks[-1].strip()
    m = _ANSWER_OPEN.search(text)
    if m:
        return m.group(1).strip()
    return _THINK_BLOCK.sub("", text).strip()


def extract_think(text: str) -> str | None:
    m = _THINK_TAG.search(text)
    return m.group(1).strip() if m else None


def parse_answer(text: str | None, types: Collection[str] | None = None) -> ParsedAnswer:
    """Parse a model answer (with or without tags) into triples. Never raises on model output.

    ``types``: the label set, when known. Types are then matched case-insensitively and written in the set's
    spelling, and an entity/type pair written in the wrong order (``PER|Obama|None``) is put right.
    """
    try:
        return _parse(text, types)
    except Exception as exc:  # a parser bug must not kill a training step or a stage: report it as unparsable
        return ParsedAnswer([], "unparsable", [f"parser error {type(exc).__name__}: {exc}"])


def _parse(text: str | None, types: Collection[str] | None) -> ParsedAnswer:
    if text is None:
        return ParsedAnswer([], "empty", ["no text"])
    text = str(text)
    notes: list[str] = []
    if len(_ANSWER_BLOCK.findall(_THINK_CLOSED.sub("", text))) > 1:
        notes.append("several <answer> blocks: read the last")
    body = _SPECIAL_TOKENS.sub("", extract_answer(text).translate(_FULLWIDTH))
    fence = _CODE_FENCE.search(body)
    if fence:
        body = fence.group(1)
        notes.append("read the answer inside a code fence")
    body = body.strip()
    if not body:
        return ParsedAnswer([], "empty", ["empty answer"])
    lead = _LEAD_IN.match(body)
    if lead:
        body = body[lead.end():].strip()
        notes.append(f"skipped lead-in {lead.group(0).strip()!r}")
    if _NO_ENTITY.fullmatch(body.strip().strip(_QUOTES).strip()):
        return ParsedAnswer([], "ok", [], notes)
    typemap = {t.lower(): t for t in types} if types else None
    if body[0] in "[{":
        value = _load_structured(body)
        if value is not None:
            return _finish(*_from_structured(value, typemap), notes)
    elif "|" not in body:
        value, skipped = _structured_after_prose(body)
        if value is not None:
            return _finish(*_from_structured(value, typemap), notes + skipped)
    return _finish(*_from_pipes(body, typemap), notes)


def _finish(triples: list[Triple], errors: list[str], notes_here: list[str], notes: list[str]) -> ParsedAnswer:
    notes = notes + notes_here
    if not triples:  # an empty structured list ({"entities": []}) is a clear "no entity"
        return ParsedAnswer([], "unparsable" if errors else "ok", errors, notes)
    return ParsedAnswer(triples, "partial" if errors else "ok", errors, notes)


# --- the pipe format -------------------------------------------------------------------------------------------------

def _from_pipes(body: str, typemap: dict[str, str] | None) -> tuple[list[Triple], list[str], list[str]]:
    triples: list[Triple] = []
    errors: list[str] = []
    notes: list[str] = []
    lines = [ln for ln in body.splitlines() if ln.strip()]
    numbered = len(lines) > 1 and all(_LIST_MARKER.match(ln) for ln in lines if "|" in ln)
    pending_prose: list[str] = []  # lines without any '|' seen since the last record
    for line in lines:
        if numbered:
            line = _LIST_MARKER.sub("", line, count=1)
        lead = _LEAD_IN.match(line)
        if lead and "|" in line:
            line = line[lead.end():]
        if "|" not in line and not (_BOXES_RE.fullmatch(line.strip().strip(";,. ")) and triples):
            pending_prose.append(line.strip())
            continue
        if pending_prose:
            (notes if not triples else errors).append(_skipped(pending_prose))
            pending_prose = []
        for segment in _segments(line):
            _read_segment(segment, triples, errors, notes, typemap)
    if pending_prose:
        if triples:
            notes.append(_skipped(pending_prose))
        else:
            errors.append(_skipped(pending_prose))
    if not triples and not errors:
        errors.append("no entity record found")
    return triples, errors, notes


def _skipped(lines: list[str]) -> str:
    text = " / ".join(lines)
    return f"skipped text {text[:80]!r}"


def _segments(line: str) -> list[str]:
    """Split one line at ';' into record segments, re-joining pieces of an entity that itself contains ';'
    (Twitter text has entities such as ``Fox &amp ; Fin Financial Group``)."""
    pieces = line.split(";")
    out: list[str] = []
    carry: str | None = None
    for piece in pieces:
        if carry is not None:
            piece = carry + ";" + piece
            carry = None
        stripped = piece.strip()
        if not stripped:
            continue
        if piece.count("|") == 0 and not _BOXES_RE.fullmatch(stripped.strip(",. ")):
            carry = piece  # an entity fragment: it continues after the ';'
            continue
        out.append(piece)
    if carry is not None:
        out.append(carry)
    return out


def _read_segment(segment: str, triples: list[Triple], errors: list[str], notes: list[str],
                  typemap: dict[str, str] | None) -> None:
    seg = segment.strip().rstrip(",").rstrip()
    if seg.endswith(".") and not seg.endswith(".."):
        seg = seg[:-1].rstrip()
    if not seg:
        return
    if "|" not in seg:
        boxes = _read_boxes(seg)
        last = triples[-1] if triples else None
        if boxes and last is not None and last.boxes is not None:  # "A|PER|[..]; [..]": a second box of A
            triples[-1] = Triple(last.entity, last.type, last.boxes + boxes)
            notes.append(f"box-only segment {seg[:40]!r} joined to {last.entity!r}")
        else:
            errors.append(f"could not read {seg[:80]!r}")
        return
    fields = [f.strip() for f in seg.split("|")]
    if len(fields) > 3:
        pieces = _COMMA_AFTER_LOCATION.split(seg)
        if len(pieces) > 1 and all(p.count("|") == 2 for p in pieces):  # "A|PER|None, B|LOC|[..]"
            notes.append(f"records separated by ',' in {seg[:40]!r}")
            for piece in pieces:
                _read_segment(piece, triples, errors, notes, typemap)
            return
    if len(fields) != 3:
        errors.append(f"could not read {seg[:80]!r}: expected entity|TYPE|location, found {len(fields)} fields")
        return
    locs = [i for i, f in enumerate(fields) if _is_location(f)]
    if len(locs) > 1 and 2 in locs:
        locs = [2]
    if len(locs) != 1:
        errors.append(f"could not read {seg[:80]!r}: no location (a box [x1,y1,x2,y2] or None) in it")
        return
    loc_index = locs[0]
    if loc_index != 2:
        notes.append(f"location in field {loc_index + 1} of {seg[:40]!r}")
    rest = [f for i, f in enumerate(fields) if i != loc_index]
    triple = _make_triple(rest[0], rest[1], _read_location(fields[loc_index]), typemap, notes)
    if triple is None:
        errors.append(f"could not read {seg[:80]!r}: empty entity or type")
    else:
        triples.append(triple)


def _is_location(text: str) -> bool:
    t = text.strip().strip(_QUOTES).strip()
    return bool(_NONE_LOC.fullmatch(t) or _BOXES_RE.fullmatch(t))


def _read_location(text: str) -> tuple[Box, ...] | None:
    t = text.strip().strip(_QUOTES).strip()
    if _NONE_LOC.fullmatch(t):
        return None
    return _read_boxes(t)


def _read_boxes(text: str) -> tuple[Box, ...]:
    return tuple(tuple(float(v) for v in _NUMS.findall(b)) for b in _BOX_ONE_RE.findall(text))  # type: ignore[misc]


_PAIRS = {'"': '"', "'": "'", "`": "`", "*": "*", "“": "”", "‘": "’"}


def _clean(text: str) -> str:
    """Collapse whitespace and remove quotes or markdown emphasis wrapped around the WHOLE field (``"Obama"``,
    ``**Obama**``); an unpaired mark is text (a Twitter entity can start with ``*``)."""
    text = " ".join(str(text).split())
    while len(text) > 2 and _PAIRS.get(text[0]) == text[-1]:
        text = text[1:-1].strip()
    return text


def _make_triple(entity: str, type_: str, boxes: tuple[Box, ...] | None, typemap: dict[str, str] | None,
                 notes: list[str]) -> Triple | None:
    entity, type_ = _clean(entity), _clean(type_)
    if typemap is not None:
        if type_.lower() not in typemap and entity.lower() in typemap:
            entity, type_ = type_, entity
            notes.append(f"type and entity swapped in {type_}|{entity}")
        type_ = typemap.get(type_.lower(), type_)
    if not entity or not type_:
        return None
    return Triple(entity, type_, boxes or None)


# --- JSON / Python-literal answers -----------------------------------------------------------------------------------

def _load_structured(body: str) -> Any:
    for loader in (json.loads, ast.literal_eval):
        try:
            return loader(body)
        except Exception:  # noqa: BLE001 - any failure just means "not this format"
            continue
    return None


def _structured_after_prose(body: str) -> tuple[Any, list[str]]:
    """A JSON/literal list or object that starts a line after some prose (``Here you go:\n[{...}]``)."""
    m = re.search(r"^[ \t]*[\[{]", body, re.M)
    if not m:
        return None, []
    candidate = body[m.start():]
    end = max(candidate.rfind("]"), candidate.rfind("}"))
    value = _load_structured(candidate[:end + 1]) if end >= 0 else None
    if value is None:
        return None, []
    skipped = [s for s in (body[:m.start()].strip(), candidate[end + 1:].strip()) if s]
    return value, [f"skipped text {s[:80]!r}" for s in skipped]


def _from_structured(value: Any, typemap: dict[str, str] | None) -> tuple[list[Triple], list[str], list[str]]:
    triples: list[Triple] = []
    errors: list[str] = []
    notes: list[str] = ["read a JSON/literal answer"]
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        if _pick(value, _ENTITY_KEYS) is not None:
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
            errors.append(err or f"could not read {str(item)[:80]!r}")
    return triples, errors, notes


def triple_from_obj(item: Any, typemap: dict[str, str] | None = None,
                    notes: list[str] | None = None) -> tuple[Triple | None, str | None]:
    """One triple from a JSON object (``{"entity", "type", "boxes"|"box"|"bbox_2d"|...}``) or a 3-item list."""
    notes = notes if notes is not None else []
    if isinstance(item, dict):
        low = {str(k).lower(): v for k, v in item.items()}
        entity, type_ = _pick(low, _ENTITY_KEYS), _pick(low, _TYPE_KEYS)
        loc_key = next((k for k in _LOC_KEYS if k in low), None)
        if entity is None or type_ is None:
            return None, f"could not read {str(item)[:80]!r}: no entity or type key"
        if loc_key is None:
            notes.append(f"no location key for {entity!r}: read as None")
            loc: Any = None
        else:
            loc = low[loc_key]
    elif isinstance(item, (list, tuple)) and len(item) == 3:
        locs = [i for i, v in enumerate(item) if _value_is_location(v)]
        loc_index = 2 if 2 in locs or not locs else locs[0]
        rest = [v for i, v in enumerate(item) if i != loc_index]
        entity, type_, loc = rest[0], rest[1], item[loc_index]
    else:
        return None, f"could not read {str(item)[:80]!r}: not an object or an [entity, type, location] list"
    if not isinstance(entity, str) or not isinstance(type_, str):
        return None, f"could not read {str(item)[:80]!r}: entity and type must be text"
    boxes, err = boxes_from_value(loc)
    if err:
        return None, f"could not read the location of {entity!r}: {err}"
    triple = _make_triple(entity, type_, boxes, typemap, notes)
    return (triple, None) if triple is not None else (None, f"could not read {str(item)[:80]!r}: empty entity/type")


def _pick(obj: dict, keys: Sequence[str]) -> Any:
    for k in keys:
        if k in obj:
            return obj[k]
    return None


def _value_is_location(v: Any) -> bool:
    if v is None or (isinstance(v, (list, tuple)) and not isinstance(v, str)):
        return True
    return isinstance(v, str) and _is_location(v)


def boxes_from_value(loc: Any) -> tuple[tuple[Box, ...] | None, str | None]:
    """A location value from JSON -> (boxes or None, error). Accepts None/"None"/[] (no box), one box of 4 numbers,
    a list of such boxes, a ``{"x1","y1","x2","y2"}`` object, or a string in the pipe format's box syntax."""
    if loc is None:
        return None, None
    if isinstance(loc, str):
        t = loc.strip().translate(_FULLWIDTH)
        if _NONE_LOC.fullmatch(t) or not t:
            return None, None
        if _BOXES_RE.fullmatch(t):
            return _read_boxes(t), None
        return None, f"{loc[:40]!r} is not a box"
    if isinstance(loc, dict):
        low = {str(k).lower(): v for k, v in loc.items()}
        try:
            return (tuple(float(low[k]) for k in ("x1", "y1", "x2", "y2")),), None  # type: ignore[return-value]
        except (KeyError, TypeError, ValueError):
            return None, f"{str(loc)[:40]!r} is not a box"
    if isinstance(loc, (list, tuple)):
        if not loc:
            return None, None
        if all(_is_number(v) for v in loc):
            if len(loc) != 4:
                return None, f"a box needs 4 numbers, got {len(loc)}"
            return (tuple(float(v) for v in loc),), None  # type: ignore[return-value]
        boxes = []
        for b in loc:
            got, err = boxes_from_value(b)
            if err:
                return None, err
            if got:
                boxes.extend(got)
        return (tuple(boxes) or None), None
    return None, f"{str(loc)[:40]!r} is not a box"


def _is_number(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, (int, float)):
        return v == v  # not NaN
    if isinstance(v, str):
        try:
            float(v)
            return True
        except ValueError:
            return False
    return False


# --- gold and comparison ---------------------------------------------------------------------------------------------

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
