"""Building the knowledge stage's requests (pure): the generator prompt per coarse type, the voter's and the summary's
prompts, and the JSON schemas that servers which enforce ``json_schema`` (vLLM, OpenAI; llama.cpp through
``json_object``) hold the answers to. The wording lives in ``prompts/knowledge/*.yaml``.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from typing import Any, Sequence

from gmner_pipeline.prompts import load_yaml, prompt_path

COMMON = "knowledge/common.yaml"
POST_MARKERS = ("<<<POST", "POST>>>")


def template_file(name: str) -> str:
    return f"knowledge/{name}.yaml"


@dataclass(frozen=True)
class Aspect:
    name: str
    ask: str


@dataclass(frozen=True)
class Template:
    """One coarse type's knowledge template: how the entity is introduced and the aspects asked about."""

    name: str
    kind: str  # how the generator prompt introduces the entity ("a person")
    short: str  # how the voter and summary prompts name the kind
    aspects: tuple[Aspect, ...]

    @property
    def aspect_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.aspects)


def load_template(name: str, max_aspects: int | None = None) -> Template:
    """``prompts/knowledge/<name>.yaml``, keeping its first ``max_aspects`` aspects (all when None)."""
    data = load_yaml(template_file(name))
    aspects = tuple(Aspect(str(a["name"]), str(a["ask"])) for a in data["aspects"])
    if not aspects or len({a.name for a in aspects}) != len(aspects):
        raise ValueError(f"{prompt_path(template_file(name))}: aspects must be a non-empty list of distinct names")
    kind = str(data["kind"])
    return Template(name, kind, str(data.get("short") or kind), aspects[:max_aspects] if max_aspects else aspects)


def safe_text(text: str, limit: int) -> str:
    """Data quoted into a prompt: at most ``limit`` characters, on one line, with the quoting markers and braces
    defused so that the data cannot close its own quotation or reach the template's placeholders."""
    text = " ".join(str(text).split())[:limit]
    for marker in POST_MARKERS:
        text = text.replace(marker, marker.replace("<<<", "<< <").replace(">>>", "> >>"))
    return text.replace("<<<", "<< <").replace(">>>", "> >>")


def _fill(template: str, **values: str) -> str:
    """``str.format`` that treats every value as data (a brace inside a tweet is never a placeholder)."""
    names = {f for _, f, _, _ in string.Formatter().parse(template) if f}
    missing = names - set(values)
    if missing:
        raise KeyError(f"knowledge prompt placeholder(s) {sorted(missing)} have no value")
    return template.format(**values)


def generator_example(template: Template) -> str:
    return json.dumps({"fine_type": "<one of the types above>",
                       "aspects": {a.name: "<one sentence, or N/A>" for a in template.aspects}})


def generator_messages(entity: str, template: Template, fine_types: Sequence[str], sentence: str | None,
                       *, max_entity_chars: int, max_context_chars: int) -> list[dict[str, str]]:
    common = load_yaml(COMMON)
    entity_text = safe_text(entity, max_entity_chars)
    context = ""
    if sentence:
        context = _fill(common["context"], entity=entity_text, sentence=safe_text(sentence, max_context_chars))
    user = _fill(common["generator"], entity=entity_text, kind=template.kind, fine_types=", ".join(fine_types),
                 aspects="\n".join(f"- {a.name}: {a.ask}" for a in template.aspects), context=context,
                 example=generator_example(template))
    return [{"role": "system", "content": common["system"]}, {"role": "user", "content": user}]


def generator_schema(template: Template, fine_types: Sequence[str] | None) -> dict[str, Any]:
    """What a generator answer must look like: a fine type (from the allowed ones, when ``fine_types`` is given)
    and one string per aspect."""
    fine: dict[str, Any] = {"type": "string"}
    if fine_types:
        fine["enum"] = list(fine_types)
    return {
        "type": "object",
        "properties": {
            "fine_type": fine,
            "aspects": {"type": "object", "properties": {a.name: {"type": "string"} for a in template.aspects},
                        "required": list(template.aspect_names), "additionalProperties": False},
        },
        "required": ["fine_type", "aspects"],
        "additionalProperties": False,
    }


def voter_example(template: Template, labels: Sequence[str]) -> str:
    aspect = template.aspects[0].name
    return json.dumps({"fine_type": "<the type most models chose>",
                       "aspects": [{"aspect": aspect, "text": "<one sentence they agree on>",
                                    "support": list(labels[:2])}]})


def format_answers(template: Template, labelled: Sequence[tuple[str, str | None, dict[str, str]]],
                   max_chars: int) -> str:
    """The answers the voter reads: ``(letter, fine type, {aspect: sentence})`` per generator; an aspect a
    generator did not answer (or answered N/A) is shown as N/A."""
    lines = ["fine type: " + "; ".join(f"{label}: {safe_text(ft or 'N/A', 80)}" for label, ft, _ in labelled)]
    for aspect in template.aspect_names:
        lines.append(f"{aspect}:")
        for label, _, aspects in labelled:
            lines.append(f"  {label}: {safe_text(aspects.get(aspect) or 'N/A', max_chars)}")
    return "\n".join(lines)


def voter_messages(entity: str, template: Template, labelled: Sequence[tuple[str, str | None, dict[str, str]]],
                   required: int, *, max_entity_chars: int, max_answer_chars: int) -> list[dict[str, str]]:
    common = load_yaml(COMMON)
    labels = [label for label, _, _ in labelled]
    user = _fill(common["voter"], count=str(len(labelled)), entity=safe_text(entity, max_entity_chars),
                 kind=template.short, required=str(required),
                 answers=format_answers(template, labelled, max_answer_chars),
                 example=voter_example(template, labels))
    return [{"role": "system", "content": common["system"]}, {"role": "user", "content": user}]


def voter_schema(template: Template, labels: Sequence[str]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "fine_type": {"type": "string"},
            "aspects": {"type": "array", "items": {
                "type": "object",
                "properties": {"aspect": {"type": "string", "enum": list(template.aspect_names)},
                               "text": {"type": "string"},
                               "support": {"type": "array", "items": {"type": "string", "enum": list(labels)}}},
                "required": ["aspect", "text", "support"], "additionalProperties": False}},
        },
        "required": ["fine_type", "aspects"],
        "additionalProperties": False,
    }


def voted_text(kept: Sequence[tuple[str, str]]) -> str:
    """The voted knowledge as stored and summarised: one ``aspect: sentence`` line per kept aspect."""
    return "\n".join(f"{aspect}: {text}" for aspect, text in kept)


def summary_messages(entity: str, template: Template, voted: str, words: int,
                     *, max_entity_chars: int) -> list[dict[str, str]]:
    common = load_yaml(COMMON)
    user = _fill(common["summary"], entity=safe_text(entity, max_entity_chars), kind=template.short, voted=voted,
                 words=str(words))
    return [{"role": "system", "content": common["system"]}, {"role": "user", "content": user}]


def json_format(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI ``response_format`` holding ``schema`` (the client maps it for llama.cpp)."""
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
