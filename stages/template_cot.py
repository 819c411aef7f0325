"""Stage 4, template style: deterministic reasoning chains built from the gold labels (MCR MRSI, template style).

Each chain walks the four constraints of the method spec: C_s entity recognition (the span comes from the text),
C_t type classification (from the sentence), C_e visual entailment (is the entity visible?), C_u visual grounding (a
box only for visible entities), then ends in the E2E-GMNER answer. Two routes order the steps differently:

* ``entity_first``: entity by entity, all four constraints for one entity before the next;
* ``constraint_first``: constraint by constraint, each step covering every entity.

Variation is seeded from the run seed, the stage's seed offset, the record id, the route and the chain index through
sha256 (never Python's ``hash()``, which is salted per process), so a chain is identical across runs, processes and
machines. The seed picks the order of the triples (in the reasoning and the answer), the order of the fields in the
summary lines, the position of the type step in the ``entity_first`` route, and one phrasing per step from the
template files in ``prompts/template_cot/``.

Every chain is checked: parsing its assistant turn must give exactly the gold triples; the result is stored in the
chain's ``consistent`` / ``rejection`` fields.

Records whose ``grounding_labels`` is ``absent`` (synthetic text-only pairs: boxes unknown) get no chain and
``cot.skipped = "grounding_absent"``: a template chain would have to claim "not visible" (or invent a box) for
entities whose visibility nobody knows, and the answer format has no "unknown" location. Any other value than
``present`` is treated alike (``cot.skipped = "grounding_unknown"``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Literal, Sequence

from pydantic import Field, field_validator

from gmner_pipeline.answer import (
    Triple, format_answer, format_box, format_turn, gold_triples, parse_answer, same_triples,
)
from gmner_pipeline.prompts import load_yaml, prompt_hash
from gmner_pipeline.schema import GROUNDING_ABSENT, GROUNDING_PRESENT
from gmner_pipeline.splits import DatasetConfig, dataset_split
from gmner_pipeline.stage import Record, Stage, StageConfig

STYLE = "template"
ROUTES = ("entity_first", "constraint_first")
Route = Literal["entity_first", "constraint_first"]
COMMON_TEMPLATE = "template_cot/common.yaml"
SKIP_GROUNDING_ABSENT = "grounding_absent"
SKIP_GROUNDING_UNKNOWN = "grounding_unknown"  # grounding_labels neither "present" nor "absent" (malformed record)
FIELDS = ("entity", "type", "location")
CONTEXT_TOKENS = 3  # neighbouring tokens shown on each side of a mention


def route_template(route: str) -> str:
    return f"template_cot/{route}.yaml"


# --- seeded, version-proof randomness -------------------------------------------------------------------------------

def chain_seed(run_seed: int, seed_offset: int, record_id: str, route: str, index: int) -> int:
    """A 63-bit seed for one chain, stable across runs, processes, machines and Python versions."""
    payload = f"{run_seed}\x1f{seed_offset}\x1f{record_id}\x1f{route}\x1f{index}".encode()
    return int.from_bytes(hashlib.sha256(payload).digest()[:8], "big") >> 1


class Draw:
    """Deterministic draws from a seed. Built on sha256 of (seed, counter) rather than ``random.Random`` so that the
    sequence cannot change with the Python version."""

    def __init__(self, seed: int):
        self.seed = seed
        self._counter = 0

    def below(self, n: int) -> int:
        if n <= 0:
            raise ValueError("below(n) needs n >= 1")
        self._counter += 1
        digest = hashlib.sha256(f"{self.seed}:{self._counter}".encode()).digest()
        return int.from_bytes(digest[:8], "big") % n  # modulo bias < n / 2**64: irrelevant here

    def pick(self, options: Sequence[str]) -> str:
        return options[self.below(len(options))]

    def shuffled(self, items: Sequence[Any]) -> list[Any]:
        out = list(items)
        for i in range(len(out) - 1, 0, -1):  # Fisher-Yates
            j = self.below(i + 1)
            out[i], out[j] = out[j], out[i]
        return out


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
                route_phrases: dict | None = None) -> tuple[dict[str, Any], Variation]:
    """One template chain for a record with grounding labels (a COT_CHAIN dict) and the choices its seed made."""
    if route not in ROUTES:
        raise ValueError(f"unknown template route {route!r}; choose from {ROUTES}")
    common = common if common is not None else load_yaml(COMMON_TEMPLATE)
    route_phrases = route_phrases if route_phrases is not None else load_yaml(route_template(route))
    draw = Draw(seed)
    mentions = mentions_of(record, use_fine_types)
    order = draw.shuffled(range(len(mentions))) if vary_triple_order else list(range(len(mentions)))
    field_order = draw.shuffled(FIELDS) if vary_field_order else list(FIELDS)
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
    consistent, rejection = check_chain(text, record)
    chain = {"style": STYLE, "route": route, "model_id": None, "seed": seed, "think": think, "answer": answer,
             "text": text, "consistent": consistent, "rejection": rejection, "attempts": 1}
    return chain, Variation(tuple(order), tuple(field_order), type_first)


def check_chain(turn: str, record: Record) -> tuple[bool, str | None]:
    """Parse the whole assistant turn (as a trainer would see it) and compare with the gold triples."""
    parsed = parse_answer(turn)
    if not parsed.ok:
        return False, f"answer not fully parsable ({parsed.status}): {'; '.join(parsed.errors)[:300]}"
    gold = gold_triples(record)
    if not same_triples(parsed.triples, gold):
        return False, (f"parsed answer differs from gold: parsed {len(parsed.triples)} triple(s) "
                       f"{[t.entity for t in parsed.triples][:10]}, gold {len(gold)} {[t.entity for t in gold][:10]}")
    return True, None


# --- the stage ------------------------------------------------------------------------------------------------------

class TemplateCoTConfig(StageConfig):
    routes: list[Route] = Field(default_factory=lambda: list(ROUTES), min_length=1,
                                description="reasoning routes (step orders); one set of chains per route")
    chains_per_route: int = Field(1, ge=1, le=16, description="chains per route and record, each with its own seed")
    seed_offset: int = Field(0, description="added to the run seed (run.seed) for this stage's draws")
    vary_triple_order: bool = Field(True, description="seeded order of the triples (reasoning and answer)")
    vary_field_order: bool = Field(True, description="seeded order of entity/type/location in the summary lines")
    use_fine_types: bool = Field(True, description="mention an entity's fine type (when the record has one) in the "
                                 "type step; the answer keeps the coarse type")

    @field_validator("routes")
    @classmethod
    def _distinct(cls, routes: list[str]) -> list[str]:
        if len(set(routes)) != len(routes):
            raise ValueError(f"a route appears twice: {routes}")
        return routes

    def template_hash(self) -> str:
        return prompt_hash(COMMON_TEMPLATE, *(route_template(r) for r in self.routes))

    def key_payload(self) -> dict[str, Any]:
        """The stage key also covers the template files: editing a phrase recomputes the chains on the next run."""
        return {**super().key_payload(), "template_hash": self.template_hash()}


def template_cot(record: Record, config: TemplateCoTConfig, run_seed: int,
                 dataset: DatasetConfig | None = None) -> Record:
    """Add template chains to one active record (pure apart from reading the cached template files). ``cot.split``
    (D1/D2, None for dev and test records) comes from the one owner of the split, ``splits.dataset_split``."""
    cot = dict(record.get("cot") or {})
    kept = [c for c in cot.get("chains") or [] if c.get("style") != STYLE]  # other styles' chains stay
    cot["split"] = dataset_split(record, dataset or DatasetConfig(), run_seed)
    grounding = record.get("grounding_labels")
    if grounding != GROUNDING_PRESENT:  # visibility unknown: a chain would have to invent it
        cot.update(chains=kept, skipped=SKIP_GROUNDING_ABSENT if grounding == GROUNDING_ABSENT
                   else SKIP_GROUNDING_UNKNOWN)
        record["cot"] = cot
        return record
    common = load_yaml(COMMON_TEMPLATE)
    chains = []
    for route in config.routes:
        phrases = load_yaml(route_template(route))
        for index in range(config.chains_per_route):
            seed = chain_seed(run_seed, config.seed_offset, record["id"], route, index)
            chain, _ = build_chain(record, route, seed, vary_triple_order=config.vary_triple_order,
                                   vary_field_order=config.vary_field_order, use_fine_types=config.use_fine_types,
                                   common=common, route_phrases=phrases)
            chains.append(chain)
    cot.update(chains=kept + chains, skipped=None)
    record["cot"] = cot
    return record


class TemplateCoTStage(Stage):
    """Deterministic template chains from gold labels; needs no model, no GPU and no network."""

    name = "template_cot"
    version = "2"  # 2: cot.split holds the record's D1/D2 assignment
    Config = TemplateCoTConfig
    reads = frozenset()  # the sample's gold entities only
    writes = frozenset({"cot"})

    config: TemplateCoTConfig

    def setup(self) -> None:
        self.prompt_hash = self.config.template_hash()  # recorded in every record's lineage

    def process(self, records: list[Record]) -> list[Record]:
        for record in records:
            template_cot(record, self.config, self.context.seed, self.context.dataset)
        return records
