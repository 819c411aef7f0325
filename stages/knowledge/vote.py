"""Reading the generators' answers and checking the voter's (pure functions; never raise on model output).

The vote is auditable: every aspect the voter keeps must name the generators that support it, and the check below
keeps it only when

* the aspect is one of the template's (``unknown_aspect`` otherwise),
* its text is content, not a non-answer such as "N/A" (``non_answer``),
* at least one cited generator actually stated that aspect (``unstated``: the voter invented it; a cited generator
  that gave N/A or nothing for it is not support, counted as ``support_not_stated``),
* the stating supporters reach the required agreement (``below_agreement``), and
* enough of the voted text's content words come from what its supporters wrote (``ungrounded``; ``min_overlap``).

The fine type is decided without trusting the voter: the plurality of the generators' valid (ontology) fine types,
the voter's choice breaking a tie only among the tied ones.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from gmner_pipeline.answer import parse_json_object

from .ontology import normalise_fine_type, validate_fine_type

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
_STOP = frozenset("""a an the and or of to in on at by for with from as is are was were be been being it its this that
these those their his her he she they them who which what when where there here has have had not no but so than
then very often usually typically commonly also can may might will would could should one ones""".split())
_ASPECT_KEYS = ("aspects", "visual_aspects", "knowledge", "visual_knowledge", "description", "appearance_aspects")
_FINE_KEYS = ("fine_type", "fine_grained_type", "finetype", "fine", "type", "category")


def normalise_aspect(name: object) -> str:
    return "_".join(str(name).strip().strip("\"'*-:").lower().replace("-", " ").split())


def compile_non_answers(patterns: Iterable[str]) -> re.Pattern[str]:
    """One pattern for the configured non-answers (each a regular expression matched at the start of the text,
    case-insensitively, after punctuation and quotes are stripped)."""
    return re.compile("|".join(f"(?:{p})" for p in patterns) or r"(?!)", re.IGNORECASE)


def is_non_answer(text: object, non_answers: re.Pattern[str]) -> bool:
    """True for "N/A"-style answers (and for empty or non-text values): legitimate, but never content to vote on."""
    if not isinstance(text, str):
        return True
    stripped = text.strip().strip("\"'`*.()[]-–—:; ").strip()
    return not stripped or bool(non_answers.match(stripped))


@dataclass
class GeneratorAnswer:
    """What one generator said about an entity, as read."""

    role: str
    label: str  # the letter the voter sees
    model_id: str
    text: str
    ok: bool = False
    error: str | None = None
    transient: bool = False  # the request failed for a reason outside it (llm.LLMResult.transient)
    fine_type_raw: str | None = None  # as written
    fine_type: str | None = None  # validated against the ontology
    aspects: dict[str, str] = field(default_factory=dict)  # stated aspects only (non-answers removed)
    non_answers: int = 0  # aspects answered N/A (or left empty)
    notes: list[str] = field(default_factory=list)


def _line_aspects(text: str, names: Sequence[str]) -> dict[str, str]:
    """``aspect: sentence`` lines, for models that ignore the JSON format."""
    wanted = set(names)
    out: dict[str, str] = {}
    for line in text.splitlines():
        head, sep, rest = line.partition(":")
        name = normalise_aspect(head.lstrip("-*0123456789. \t"))
        if sep and name in wanted and name not in out:
            out[name] = rest.strip()
    return out


def read_generator(answer: GeneratorAnswer, aspect_names: Sequence[str], allowed: Sequence[str],
                   non_answers: re.Pattern[str], *, truncated: bool = False) -> GeneratorAnswer:
    """Fill ``answer`` from its text: the fine type (validated) and the stated aspects. An answer with neither a
    fine type nor any aspect the template asked for is not ok (``unparsable``)."""
    from gmner_pipeline.answer import close_json

    obj, notes = parse_json_object(answer.text)
    if obj is None and truncated:
        obj, more = parse_json_object(close_json(answer.text))
        if obj is not None:
            notes = ["answer cut at max_tokens: read what was complete"]
    answer.notes += [n for n in notes if n != "no JSON object found"]
    raw: dict[str, Any] = {}
    fine: Any = None
    if obj is not None:
        nested = next((obj[k] for k in _ASPECT_KEYS if isinstance(obj.get(k), dict)), None)
        raw = nested if nested is not None else obj
        fine = next((obj[k] for k in _FINE_KEYS if isinstance(obj.get(k), str)), None)
        by_name = {normalise_aspect(k): v for k, v in raw.items()}
        raw = {n: by_name[n] for n in aspect_names if n in by_name}
    else:
        raw = _line_aspects(answer.text, aspect_names)
        if raw:
            answer.notes.append("read 'aspect: sentence' lines (no JSON object)")
    for name in aspect_names:
        value = raw.get(name)
        if isinstance(value, list):
            value = " ".join(str(v) for v in value if isinstance(v, (str, int, float)))
        if isinstance(value, str) and not is_non_answer(value, non_answers):
            answer.aspects[name] = " ".join(value.split())
        else:
            answer.non_answers += 1
    if isinstance(fine, str) and not is_non_answer(fine, non_answers):
        answer.fine_type_raw = fine.strip()[:200]
        answer.fine_type = validate_fine_type(fine, allowed)
    answer.ok = bool(raw) or answer.fine_type_raw is not None
    if not answer.ok:
        answer.error = "unparsable: " + ("; ".join(notes) or "no aspect the template asked for")
    return answer


def required_support(answered: int, agreement: float, min_support: int) -> int:
    """How many stating generators an aspect needs: ``agreement`` of those that answered, and at least
    ``min_support`` (2 by default: what only one model claims is dropped)."""
    return max(min_support, math.ceil(agreement * answered - 1e-9))


def content_words(text: str) -> set[str]:
    return {w for w in (m.group(0).lower() for m in _WORD.finditer(text)) if len(w) > 2 and w not in _STOP}


def overlap(text: str, sources: Iterable[str]) -> float:
    """Share of the content words of ``text`` that occur in ``sources`` (1.0 when it has none)."""
    words = content_words(text)
    if not words:
        return 1.0
    known: set[str] = set()
    for s in sources:
        known |= content_words(s)
    return len(words & known) / len(words)


@dataclass
class VoteOutcome:
    kept: list[tuple[str, str, list[str]]] = field(default_factory=list)  # (aspect, text, supporting roles)
    rejected: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    voter_fine_type: str | None = None


def _label_of(value: object, by_label: dict[str, GeneratorAnswer]) -> GeneratorAnswer | None:
    """A cited supporter: its letter ("A"), "model A", or its role name."""
    if not isinstance(value, str):
        return None
    v = value.strip().strip("\"'()[].").lower()
    v = v.removeprefix("model ").removeprefix("generator ").strip()
    for label, ans in by_label.items():
        if v in (label.lower(), ans.role.lower()):
            return ans
    return None


def _vote_entries(obj: dict[str, Any]) -> list[Any]:
    """The voter's aspects as a list of entries, from a list or an ``{aspect: {text, support}}`` mapping."""
    entries = obj.get("aspects")
    if isinstance(entries, dict):
        return [{"aspect": k, **v} if isinstance(v, dict) else {"aspect": k, "text": v, "support": []}
                for k, v in entries.items()]
    return entries if isinstance(entries, list) else []


def check_vote(obj: dict[str, Any], answers: Sequence[GeneratorAnswer], aspect_names: Sequence[str],
               required: int, non_answers: re.Pattern[str], min_overlap: float) -> VoteOutcome:
    """Keep the voter's aspects that pass every rule of the module docstring, in template order."""
    out = VoteOutcome()
    by_label = {a.label: a for a in answers if a.ok}
    fine = obj.get("fine_type")
    out.voter_fine_type = fine if isinstance(fine, str) else None
    kept: dict[str, tuple[str, list[str]]] = {}
    for entry in _vote_entries(obj):
        if not isinstance(entry, dict):
            out.rejected["malformed_entry"] += 1
            continue
        name = normalise_aspect(entry.get("aspect", ""))
        if name not in aspect_names:
            out.rejected["unknown_aspect"] += 1
            out.notes.append(f"voter kept an aspect the template does not ask for: {str(entry.get('aspect'))[:60]!r}")
            continue
        if name in kept:
            out.rejected["duplicate_aspect"] += 1
            continue
        text = entry.get("text")
        if is_non_answer(text, non_answers):
            out.rejected["non_answer"] += 1
            continue
        text = " ".join(str(text).split())
        cited = entry.get("support")
        cited = cited if isinstance(cited, list) else [cited]
        supporters: list[GeneratorAnswer] = []
        for c in cited:
            ans = _label_of(c, by_label)
            if ans is None or name not in ans.aspects:
                out.rejected["support_not_stated"] += 1
            elif ans not in supporters:
                supporters.append(ans)
        if not supporters:
            out.rejected["unstated"] += 1
            out.notes.append(f"voter kept {name!r}, which no generator it cited stated: rejected")
            continue
        if len(supporters) < required:
            out.rejected["below_agreement"] += 1
            continue
        if min_overlap > 0 and overlap(text, (s.aspects[name] for s in supporters)) < min_overlap:
            out.rejected["ungrounded"] += 1
            out.notes.append(f"voted {name!r} is not grounded in what its supporters wrote: rejected")
            continue
        kept[name] = (text, [a.role for a in answers if a in supporters])
    out.kept = [(n, *kept[n]) for n in aspect_names if n in kept]
    return out


def choose_fine_type(answers: Sequence[GeneratorAnswer], allowed: Sequence[str],
                     voter_choice: str | None) -> tuple[str | None, list[str]]:
    """The plurality of the generators' valid fine types and the roles that proposed it; a tie goes to the voter's
    choice when it is among the tied, else to the first in ontology order. None when no generator gave a valid one."""
    valid = [a for a in answers if a.ok and a.fine_type]
    if not valid:
        return None, []
    counts = Counter(a.fine_type for a in valid)
    top = max(counts.values())
    tied = [f for f in allowed if counts.get(f) == top]
    choice = voter_choice and normalise_fine_type(voter_choice)
    chosen = choice if choice in tied else tied[0]
    return chosen, [a.role for a in valid if a.fine_type == chosen]
