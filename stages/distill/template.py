"""The template style: deterministic reasoning chains built from the gold labels (MCR MRSI, template style).

Each chain walks the four constraints of the method spec: C_s entity recognition (the span comes from the text),
C_t type classification (from the sentence), C_e visual entailment (is the entity visible?), C_u visual grounding (a
box only for visible entities), then ends in the E2E-GMNER answer. Two routes order the steps differently:

* ``entity_first``: entity by entity, all four constraints for one entity before the next;
* ``constraint_first``: constraint by constraint, each step covering every entity.

Variation is seeded (``variation.py``) from the run seed, the seed offset, the record id, the route and the chain
index. The seed picks the order of the triples (in the reasoning and the answer), the order of the fields in the
summary lines, the position of the type step in the ``entity_first`` route, and one phrasing per step from the
template files in ``prompts/distill/template/``. Every chain goes through the same gold check as the teachers'
(``check.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

from gmner_pipeline.answer import Triple, format_answer, format_box, format_turn, gold_triples
from gmner_pipeline.prompts import load_yaml, prompt_hash
from gmner_pipeline.stage import Record

from .check import CheckConfig, check_turn
from .variation import FIELDS, Draw, orders

STYLE = "template"
ROUTES = ("entity_first", "constraint_first")
Route = Literal["entity_first", "constraint_first"]
TEMPLATE_DIR = "distill/template"
COMMON_TEMPLATE = f"{TEMPLATE_DIR}/common.yaml"
CONTEXT_TOKENS = 3  # neighbouring tokens shown on each side of a mention


def route_template(route: str) -> str:
    return f"{TEMPLATE_DIR}/{route}.yaml"


def template_hash(routes: Sequence[str]) -> str:
    """The hash of the template files a set of routes uses (recorded in lineage, part of the stage key)."""
    return prompt_hash(COMMON_TEMPLATE, *(route_template(r) for r in routes))


# --- the facts a chain is built from --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Mention:
    """One gold entity with what the templates need: its triple and the sentence context around it."""

    triple: Triple
    context: str
    fine_type: str | None = None  # entity's fine type when known (FMNERG labels, knowledge stage)

    @property
    def entity(self) -> str:
        return self.triple.entity

    @property
    def type(self) -> str:
        return self.triple.type


def mentions_of(record: Record, use_fine_types: bool = True) -> list[Mention]:
    """Gold mentions in entity order (``gold_triples`` yields one triple per entity, in the same order)."""
    tokens = record.get("tokens") or []
    out = []
    for ent, triple in zip(record.get("entities") or [], gold_triples(record)):
        start, end = ent.get("start"), ent.get("end")
        if tokens and start is not None and end is not None:
            context = " ".join(tokens[max(0, start - CONTEXT_TOKENS):end + CONTEXT_TOKENS])
        else:
            context = triple.entity
        out.append(Mention(triple, context, (ent.get("fine_type") or None) if use_fine_types else None))
    return out


# --- chain construction (pure) --------------------------------------------------------------------------------------

class ChainWriter:
    """Fills the template phrases for one chain; every choice goes through the chain's ``Draw``."""

    def __init__(self, common: dict, route_phrases: dict, draw: Draw, field_order: Sequence[str]):
        self.common = common
        self.route = route_phrases
        self.draw = draw
        self.field_order = list(field_order)
        self._chosen: dict[str, str] = {}

    def phrase(self, table: dict, key: str, **values: Any) -> str:
        return self.draw.pick(table[key]).format(**values)

    def same_phrase(self, table: dict, key: str, **values: Any) -> str:
        """Like ``phrase``, but the variant is chosen once per chain: numbered headers and list items read as one
        consistent list instead of switching style from entity to entity."""
        if key not in self._chosen:
            self._chosen[key] = self.draw.pick(table[key])
        return self._chosen[key].format(**values)

    def tag(self, key: str) -> str:
        return self.common["tags"][key]

    def type_desc(self, type_: str) -> str:
        types = self.common["types"]
        return types.get(type_, types["default"]).format(type=type_)

    def boxes(self, triple: Triple) -> str:
        return self.common["box_join"].join(format_box(b) for b in triple.boxes or ())

    def values(self, index: int, m: Mention) -> dict[str, Any]:
        return {"index": index, "entity": m.entity, "type": m.type, "type_desc": self.type_desc(m.type),
                "context": m.context, "boxes": self.boxes(m.triple), "count": len(m.triple.boxes or ()),
                "fine_type": m.fine_type}

    def summary(self, m: Mention) -> str:
        location = self.boxes(m.triple) if m.triple.visible else self.common["location_none"]
        parts = {name: self.common["fields"][name].format(entity=m.entity, type=m.type, location=location)
                 for name in FIELDS}
        return "(" + ", ".join(parts[name] for name in self.field_order) + ")"

    def conclusion(self, n: int) -> str:
        return self.draw.pick(self.common["conclusion_one"] if n == 1 else self.common["conclusion"]).format(n=n)


def visibility_key(m: Mention, prefix: str) -> str:
    """The template key for a mention's visibility: ``<prefix>_visible``, ``_visible_many`` or ``_invisible``."""
    if not m.triple.visible:
        return f"{prefix}_invisible"
    return f"{prefix}_visible_many" if len(m.triple.boxes or ()) > 1 else f"{prefix}_visible"


def think_entity_first(w: ChainWriter, mentions: list[Mention], type_first: bool) -> list[str]:
    r = w.route
    lines = [w.draw.pick(r["opening"])]
    for i, m in enumerate(mentions, 1):
        v = w.values(i, m)
        lines.append(w.same_phrase(r, "header", **v))
        c_t = f"{w.tag('C_t')} {w.phrase(r, 'C_t', **v)}"
        if m.fine_type:
            c_t += " " + w.phrase(w.common, "fine_type", **v)
        c_e = f"{w.tag('C_e')} {w.phrase(r, visibility_key(m, 'C_e'), **v)}"
        c_u = f"{w.tag('C_u')} {w.phrase(r, visibility_key(m, 'C_u'), **v)}"
        lines.append(f"{w.tag('C_s')} {w.phrase(r, 'C_s', **v)}")
        lines += [c_t, c_e, c_u] if type_first else [c_e, c_u, c_t]
        lines.append(f"{w.tag('summary')} {w.summary(m)}")
    return lines


def think_constraint_first(w: ChainWriter, mentions: list[Mention]) -> list[str]:
    r = w.route

    def step(tag: str, key: str, item_key, **extra: Any) -> str:
        items = "; ".join(w.same_phrase(r, item_key(m), **w.values(i, m)) for i, m in enumerate(mentions, 1))
        return f"{w.tag(tag)} {w.phrase(r, key, items=items, **extra)}"

    n = len(mentions)
    return [
        w.draw.pick(r["opening"]),
        step("C_s", "C_s", lambda m: "C_s_item", n_text="one entity" if n == 1 else f"{n} entities"),
        step("C_t", "C_t", lambda m: "C_t_item_fine" if m.fine_type else "C_t_item"),
        step("C_e", "C_e", lambda m: visibility_key(m, "C_e_item")),
        step("C_u", "C_u", lambda m: visibility_key(m, "C_u_item")),
        f"{w.tag('summary')} " + "; ".join(w.summary(m) for m in mentions),
    ]


def think_no_entity(w: ChainWriter) -> list[str]:
    table = w.common["no_entity"]
    return [f"{w.tag(c)} {w.draw.pick(table[c])}" for c in ("C_s", "C_t", "C_e", "C_u")] + [
        w.draw.pick(table["conclusion"])]


@dataclass(frozen=True)
class Variation:
    """What one chain's seed decided: kept on the side so tests can check the spread of choices."""

    order: tuple[int, ...]  # permutation of the gold entity indices
    field_order: tuple[str, ...]
    type_first: bool


def build_chain(record: Record, route: str, seed: int, *, vary_triple_order: bool = True,
                vary_field_order: bool = True, use_fine_types: bool = True, common: dict | None = None,
                route_phrases: dict | None = None, check: CheckConfig | None = None
                ) -> tuple[dict[str, Any], Variation]:
    """One template chain for a record with grounding labels (a COT_CHAIN dict) and the choices its seed made.
    The chain goes through the gold check like every other style's: its ``consistent`` / ``rejection`` fields."""
    if route not in ROUTES:
        raise ValueError(f"unknown template route {route!r}; choose from {ROUTES}")
    common = common if common is not None else load_yaml(COMMON_TEMPLATE)
    route_phrases = route_phrases if route_phrases is not None else load_yaml(route_template(route))
    draw = Draw(seed)
    mentions = mentions_of(record, use_fine_types)
    order, field_order = orders(draw, len(mentions), vary_triple_order, vary_field_order)
    type_first = draw.below(2) == 0
    writer = ChainWriter(common, route_phrases, draw, field_order)
    ordered = [mentions[i] for i in order]

    lines = [writer.phrase(common, "intro", text=record.get("text") or "")]
    if not ordered:
        lines += think_no_entity(writer)
    else:
        lines += (think_entity_first(writer, ordered, type_first) if route == "entity_first"
                  else think_constraint_first(writer, ordered))
        lines.append(writer.conclusion(len(ordered)))
    think = "\n".join(lines)
    answer = format_answer(m.triple for m in ordered)
    text = format_turn(think, answer)
    verdict = check_turn(text, gold_triples(record), config=check)
    chain = {"style": STYLE, "route": route, "model_id": None, "seed": seed, "think": think, "answer": answer,
             "text": text, "consistent": verdict.consistent, "rejection": verdict.rejection, "attempts": 1}
    return chain, Variation(tuple(order), tuple(field_order), type_first)


