"""Pure helpers: the search query of a record, its scoring text, and the sentence-length filter."""

from __future__ import annotations

from typing import Any

from gmner_pipeline.prompts import load_text

Record = dict[str, Any]


def load_template(name: str) -> str:
    template = load_text(name).strip()
    try:
        template.format(text="", entities="")
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"query template {name!r} may use only {{text}} and {{entities}}: {exc}") from None
    return template


def record_text(record: Record) -> str:
    """The sentence: ``text`` when present, else the tokens joined by one space."""
    text = record.get("text")
    return text if text else " ".join(record.get("tokens") or [])


def entity_surfaces(record: Record) -> list[str]:
    """Entity surface texts in sentence order, each once (a query repeats nothing)."""
    seen: dict[str, None] = {}
    for ent in sorted(record.get("entities") or [], key=lambda e: (e.get("start") or 0, e.get("end") or 0)):
        surface = (ent.get("text") or "").strip()
        if surface:
            seen.setdefault(surface, None)
    return list(seen)


def build_query(record: Record, template: str, separator: str = ", ") -> str:
    """VKEL: the query is the sentence together with its target entities."""
    query = template.format(text=record_text(record), entities=separator.join(entity_surfaces(record)))
    return " ".join(query.split())


def sentence_length(record: Record) -> int:
    tokens = record.get("tokens")
    return len(tokens) if tokens else len(record_text(record).split())


def too_long(record: Record, max_tokens: int | None) -> bool:
    return max_tokens is not None and sentence_length(record) > max_tokens
