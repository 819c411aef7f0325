"""Stage 3: visual knowledge per entity from several LLMs, merged by an LLM semantic voter, then summarised
(VKEL §III-D-1,2; method-spec §Stage 3 and §Fine-type ontology; docs/knowledge.md).

Knowledge belongs to an entity, not to a tweet, so the stage is **keyed** (``gmner_pipeline.keyed``): each
``(entity text, type)`` of the whole input is asked once, in the table pass, and the result is joined to every record
that mentions it. Per entity:

1. N generator roles answer the coarse type's template concurrently (``prompts/knowledge/<type>.yaml``): the fine
   type (validated against the ontology) and one sentence per visual aspect, as JSON (``json_schema`` when
   ``structured_output``; the answer is read tolerantly either way).
2. If at least ``min_generators`` answers were usable, the voter merges them aspect by aspect; ``vote.check_vote``
   keeps only aspects with enough stating supporters and rejects (and counts) what no generator stated.
3. The summary role rewrites the kept aspects as appearance-only text within ``summary_max_tokens``.

Counters (``status`` and the end-of-run summary): ``generator_failed:<why>``, ``entity_failed:<why>``,
``vote_rejected:<rule>``, ``fine_type_invalid``, ``all_non_answers``, ``no_aspect_can_agree`` (no vote asked),
``no_agreed_aspects``, ``skipped:<why>``,
``summary_truncated``, ...; in the join pass ``records_without_entities`` and ``records_failed``.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, Iterable

from gmner_pipeline.hashing import stable_hash
from gmner_pipeline.keyed import TableKey
from gmner_pipeline.llm.config import LLMConfig
from gmner_pipeline.llm.identity import role_identity
from gmner_pipeline.llm.request import LLMRequest, LLMResult
from gmner_pipeline.schema import ERROR_PERMANENT, ERROR_TRANSIENT
from gmner_pipeline.stage import Record, Stage, StageSetupError, mark_error

from .config import KnowledgeConfig
from .ontology import TypeMapping
from .prompts import (Template, generator_messages, generator_schema, json_format, load_template, summary_messages,
                      voted_text, voter_messages, voter_schema)
from .vote import (GeneratorAnswer, check_vote, choose_fine_type, compile_non_answers, is_non_answer, read_generator,
                   required_support)

log = logging.getLogger(__name__)

LABELS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
STATUS_OK, STATUS_NO_AGREEMENT, STATUS_SKIPPED, STATUS_ERROR = "ok", "no_agreement", "skipped", "error"


def entity_key(text: str, type_: str, mode: str) -> str:
    """The table key of an entity: its coarse type and its text (whitespace collapsed; case-folded if asked)."""
    text = " ".join(text.split())
    return f"{type_}\x1f{text.casefold() if mode == 'casefold' else text}"


def mentions(record: Record, predictions: dict[str, list[tuple[str, str]]] | None) -> list[tuple[str, str]]:
    """``(entity text, type)`` of a record, in order, each once: its gold entities, or its predicted ones."""
    if predictions is not None:
        pairs = predictions.get(record["id"]) or predictions.get(str(record.get("sample_key"))) or []
    else:
        pairs = [(" ".join(str(e.get("text") or "").split()), str(e.get("type") or ""))
                 for e in record.get("entities") or []]
    return list(dict.fromkeys((t, ty) for t, ty in pairs if t))


def contains(sentence: str, entity: str) -> bool:
    """The entity occurs in the sentence (case-insensitive, whitespace-normalised)."""
    return " ".join(entity.split()).casefold() in " ".join(sentence.split()).casefold()


class KnowledgeStage(Stage):
    """Visual knowledge per (entity, type), asked once per run, joined to every record that mentions the entity."""

    name = "knowledge"
    version = "1"
    Config = KnowledgeConfig
    reads = frozenset()  # the sample's entities (or predictions from a file)
    writes = frozenset({"knowledge"})
    table_columns = ("text", "tokens", "entities", "sample_key")

    config: KnowledgeConfig

    # --- the driver's checks ----------------------------------------------------------------------------------------

    @classmethod
    def llm_roles(cls, config: KnowledgeConfig) -> set[str]:  # type: ignore[override]
        return {*config.generators, config.voter, config.summary}

    @classmethod
    def preflight(cls, config: KnowledgeConfig) -> None:  # type: ignore[override]
        for name in config.template_names():
            load_template(name, config.max_aspects)  # a broken template fails before the run
        if config.entities == "predicted":
            if not Path(config.predictions or "").exists():
                raise StageSetupError(f"stages.knowledge.predictions: {config.predictions} does not exist (a JSONL "
                                      "file or shards of predicted entities)")

    @classmethod
    def preflight_llm(cls, config: KnowledgeConfig, llm: LLMConfig) -> None:  # type: ignore[override]
        identities: dict[str, list[str]] = {}
        for role in config.generators:
            identities.setdefault(role_identity(llm.role(role), llm), []).append(role)
        same = {model: roles for model, roles in identities.items() if len(roles) > 1}
        for model, roles in same.items():
            log.warning("knowledge: generator roles %s all resolve to the model %s; the vote's gain comes from "
                        "different models (VKEL: ~2-3 F1 over one model). Point them at different models, or give "
                        "them different sampling so that they at least differ", roles, model)

    # --- per worker ------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.config
        self.prompt_hash = cfg.template_hash()
        self.templates = {name: load_template(name, cfg.max_aspects) for name in cfg.template_names()}
        self.non_answers = compile_non_answers(cfg.non_answers)
        self.identities = {role: self.llm.identity(role) for role in self.llm_roles(cfg)}
        for role in self.identities:  # build the clients now: a missing API key fails here, not mid-table
            self.llm.client(role)
        self.model_ids = sorted(set(self.identities.values()))
        self._key_base = stable_hash({"models": {r: self.identities[r] for r in sorted(self.identities)},
                                      "templates": self.prompt_hash, "settings": cfg.key_payload()})
        self.predictions = self._load_predictions() if cfg.entities == "predicted" else None

    def _load_predictions(self) -> dict[str, list[tuple[str, str]]]:
        from gmner_pipeline.scoring.io import load_predictions

        preds = load_predictions([Path(self.config.predictions or "")])
        for problem in preds.problems[:20]:
            log.warning("knowledge predictions: %s", problem)
        return {key: [(t.entity, t.type) for t in p.triples] for key, p in preds.by_id.items()}

    # --- the keyed table: one entry per (entity, type) of the whole input -----------------------------------------

    def table_keys(self, record: Record) -> Iterable[TableKey]:
        sentence = record.get("text") or " ".join(record.get("tokens") or [])
        source = "predicted" if self.config.entities == "predicted" else "gold"
        for text, type_ in mentions(record, self.predictions):
            inside = contains(sentence, text)
            use_context = self.config.context == "first_mention" and inside
            yield TableKey(
                entity_key(text, type_, self.config.entity_key),
                {"entity": text, "type": type_, "record_id": record["id"], "source": source,
                 "context": sentence if use_context else None, "in_sentence": inside},
                rank=0 if inside or self.config.context == "none" else 1)

    async def abuild_table(self, items: dict[str, dict[str, Any]]) -> dict[str, Any]:
        slots = asyncio.Semaphore(self.config.entities_in_flight)

        async def one(key: str, item: dict[str, Any]) -> tuple[str, dict[str, Any]]:
            async with slots:
                return key, await self.entity_knowledge(key, item)

        return dict(await asyncio.gather(*(one(k, v) for k, v in items.items())))

    async def entity_knowledge(self, key: str, item: dict[str, Any]) -> dict[str, Any]:
        """Generators, then the voter, then the summary for one entity; the knowledge item (plus internal fields)."""
        cfg = self.config
        entity, type_ = item["entity"], item["type"]
        value: dict[str, Any] = {
            "entity": entity, "type": type_, "fine_type": None, "knowledge": None, "answers": [], "voted": None,
            "cache_key": self.cache_key(key), "entity_source": item.get("source", "gold"), "status": STATUS_OK,
            "aspects": [], "fine_type_support": [], "context_id": item["record_id"] if item.get("context") else None,
            "tokens": [], "notes": [], "error": None, "asked_for": item["record_id"]}
        mapping = cfg.type_map.get(type_)
        if mapping is None:
            return self._skip(value, "unmapped_type", f"type {type_!r} has no entry in stages.knowledge.type_map "
                              f"(mapped: {sorted(cfg.type_map)})")
        if len(entity) > cfg.max_entity_chars:
            return self._skip(value, "entity_too_long", f"entity has {len(entity)} characters, more than "
                              f"max_entity_chars={cfg.max_entity_chars}: not asked")
        if item.get("context") is None and cfg.context == "first_mention":
            value["notes"].append("the entity occurs in none of its tweets' text: asked without a context sentence")
            self.count("entity_not_in_sentence")
        template = self.templates[mapping.template_name]
        allowed = mapping.fine_types()

        answers = await self._generate(entity, template, allowed, item.get("context"), value)
        usable = [a for a in answers if a.ok]
        for a in answers:
            if a.fine_type_raw and not a.fine_type:
                self.count("fine_type_invalid")
                value["notes"].append(f"{a.role} proposed fine type {a.fine_type_raw[:60]!r}, which is not one of "
                                      f"the {len(allowed)} fine types of {'/'.join(mapping.coarse)}: ignored")
        if len(usable) < cfg.min_generators:
            why = "; ".join(f"{a.role}: {a.error}" for a in answers if not a.ok)
            return self._fail(value, "too_few_generators", f"only {len(usable)} of {len(answers)} generators gave a "
                              f"usable answer (min_generators={cfg.min_generators}): {why}",
                              transient=any(a.transient for a in answers))
        fine_type, support = choose_fine_type(usable, allowed, None)
        if not any(a.aspects for a in usable):
            self.count("all_non_answers")
            value["notes"].append("every generator answered N/A (or nothing) for every aspect: no knowledge")
            return self._finish(value, fine_type, support, mapping, STATUS_NO_AGREEMENT)

        required = required_support(len(usable), cfg.agreement, cfg.min_support)
        if not any(sum(name in a.aspects for a in usable) >= required for name in template.aspect_names):
            self.count("no_aspect_can_agree")  # the vote could keep nothing: do not ask it
            value["notes"].append(f"no aspect was stated by {required} generators: nothing to vote on")
            return self._finish(value, fine_type, support, mapping, STATUS_NO_AGREEMENT)
        vote = await self._vote(entity, template, usable, required, value)
        if vote is None:
            return value  # failed: _vote set the error
        fine_type, support = choose_fine_type(usable, allowed, vote.voter_fine_type)
        for rule, n in vote.rejected.items():
            self.count(f"vote_rejected:{rule}", n)
        value["notes"] += vote.notes
        value["aspects"] = [{"aspect": a, "text": t, "support": s} for a, t, s in vote.kept]
        if not vote.kept:
            self.count("no_agreed_aspects")
            return self._finish(value, fine_type, support, mapping, STATUS_NO_AGREEMENT)
        value["voted"] = voted_text([(a, t) for a, t, _ in vote.kept])
        if not await self._summarise(entity, template, value):
            return value
        return self._finish(value, fine_type, support, mapping, STATUS_OK)

    async def _generate(self, entity: str, template: Template, allowed: tuple[str, ...], context: str | None,
                        value: dict[str, Any]) -> list[GeneratorAnswer]:
        cfg = self.config
        messages = generator_messages(entity, template, allowed, context, max_entity_chars=cfg.max_entity_chars,
                                      max_context_chars=cfg.max_context_chars)
        fmt = json_format("entity_knowledge", generator_schema(template, allowed if cfg.fine_type_enum else None))
        request = LLMRequest(messages=messages, max_tokens=cfg.generator_max_tokens,
                             response_format=fmt if cfg.structured_output else None, tag=entity[:60])
        results = await asyncio.gather(*(self.llm.client(role).acomplete(request) for role in cfg.generators))
        answers = []
        for label, role, res in zip(LABELS, cfg.generators, results):
            self._tokens(value, role, res)
            ans = GeneratorAnswer(role=role, label=label, model_id=res.model or self.identities[role],
                                  text=res.text if res.ok else "")
            if not res.ok:
                ans.error = f"{res.error_kind}: {res.error}"
                ans.transient = res.transient  # an endpoint down, not the entity: a rerun asks again
                self.count(f"generator_failed:{res.error_kind}")
            else:
                read_generator(ans, template.aspect_names, allowed, self.non_answers, truncated=_cut(res))
                if not ans.ok:
                    self.count("generator_failed:unparsable")
            answers.append(ans)
            value["answers"].append({"model_id": ans.model_id, "text": ans.text, "role": role,
                                     "fine_type": ans.fine_type_raw, "ok": ans.ok, "error": ans.error})
        return answers

    async def _vote(self, entity: str, template: Template, usable: list[GeneratorAnswer], required: int,
                    value: dict[str, Any]) -> Any:
        cfg = self.config
        labelled = [(a.label, a.fine_type_raw, a.aspects) for a in usable]
        request = LLMRequest(
            messages=voter_messages(entity, template, labelled, required, max_entity_chars=cfg.max_entity_chars,
                                    max_answer_chars=cfg.max_answer_chars),
            max_tokens=cfg.voter_max_tokens, tag=entity[:60],
            response_format=(json_format("knowledge_vote", voter_schema(template, [a.label for a in usable]))
                             if cfg.structured_output else None))
        res = await self.llm.client(cfg.voter).acomplete(request)
        self._tokens(value, cfg.voter, res)
        if not res.ok:
            self._fail(value, f"voter_{res.error_kind}", f"voter {cfg.voter}: {res.error_kind}: {res.error}",
                       transient=res.transient)
            return None
        from gmner_pipeline.answer import close_json, parse_json_object

        obj, _ = parse_json_object(res.text)
        if obj is None and _cut(res):
            obj, _ = parse_json_object(close_json(res.text))
        if obj is None:
            self._fail(value, "voter_unparsable", f"voter {cfg.voter} answered without a JSON object: "
                       f"{res.text[:200]!r}")
            return None
        return check_vote(obj, usable, template.aspect_names, required, self.non_answers, cfg.min_overlap)

    async def _summarise(self, entity: str, template: Template, value: dict[str, Any]) -> bool:
        cfg = self.config
        request = LLMRequest(messages=summary_messages(entity, template, value["voted"], cfg.summary_words,
                                                       max_entity_chars=cfg.max_entity_chars),
                             max_tokens=cfg.summary_max_tokens, tag=entity[:60])
        res = await self.llm.client(cfg.summary).acomplete(request)
        self._tokens(value, cfg.summary, res)
        if not res.ok:
            self._fail(value, f"summary_{res.error_kind}", f"summary {cfg.summary}: {res.error_kind}: {res.error}",
                       transient=res.transient)
            return False
        text = " ".join(_strip_tags(res.text).split())
        if _cut(res):
            self.count("summary_truncated")
            value["notes"].append(f"summary cut at summary_max_tokens={cfg.summary_max_tokens}")
        if is_non_answer(text, self.non_answers):
            self.count("summary_empty")
            value["notes"].append("the summary was empty or a non-answer: the voted text is kept as the knowledge")
            text = value["voted"]
        value["knowledge"] = text
        return True

    # --- small helpers ----------------------------------------------------------------------------------------------

    def cache_key(self, key: str) -> str:
        """Entity text + type + model set + templates + settings: equal keys mean an equal answer."""
        return stable_hash({"entity": key, "base": self._key_base})

    def _tokens(self, value: dict[str, Any], role: str, res: LLMResult) -> None:
        value["tokens"].append({"role": role, "model_id": res.model or self.identities[role],
                                "prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
                                "cached": res.cached})

    def _skip(self, value: dict[str, Any], why: str, note: str) -> dict[str, Any]:
        self.count(f"skipped:{why}")
        value["status"] = STATUS_SKIPPED
        value["notes"].append(note)
        return value

    def _fail(self, value: dict[str, Any], why: str, message: str, transient: bool = False) -> dict[str, Any]:
        """The entity failed. ``transient`` (an endpoint down, retries spent): its table value is computed again by
        a rerun's repair (``run.redo_errors``), and the records that need it are marked transient errors too."""
        self.count(f"entity_failed:{why}")
        value["status"] = STATUS_ERROR
        value["error"] = message
        value["error_kind"] = ERROR_TRANSIENT if transient else ERROR_PERMANENT
        return value

    def _finish(self, value: dict[str, Any], fine_type: str | None, support: list[str], mapping: TypeMapping,
                status: str) -> dict[str, Any]:
        value["fine_type"], value["fine_type_support"], value["status"] = fine_type, support, status
        if fine_type is None:
            self.count("fine_type_none")
            value["notes"].append(f"no generator proposed a valid fine type of {'/'.join(mapping.coarse)}")
        return value

    # --- the join: every record gets the items of its entities ------------------------------------------------------

    def process(self, records: list[Record]) -> list[Record]:
        for record in records:
            keys = list(self.table_keys(record))
            if not keys:
                self.count("records_without_entities")
                record["knowledge"] = []
                continue
            items, failures, prompt_tokens, completion_tokens = [], [], 0, 0
            transient = True  # the record's failure is transient when every failed entity's is
            for tk in keys:
                value = self.table.get(tk.key)
                if value is None:
                    failures.append(f"{tk.item['entity']!r} is missing from the keyed table (rerun the stage)")
                    transient = False
                    continue
                if value.get("status") == STATUS_ERROR:
                    failures.append(f"{value['entity'][:80]!r} ({value['type']}): {value.get('error')}")
                    transient = transient and value.get("error_kind") == ERROR_TRANSIENT
                if value.get("asked_for") == record["id"]:  # an entity's calls are charged to one record
                    prompt_tokens += sum(t["prompt_tokens"] for t in value["tokens"])
                    completion_tokens += sum(t["completion_tokens"] for t in value["tokens"])
                items.append({k: v for k, v in value.items() if k not in ("error", "error_kind", "asked_for")})
            record["knowledge"] = items
            self.usage(record, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
            if failures:
                self.count("records_failed")
                mark_error(record, self.name, "no knowledge for " + "; ".join(failures)[:1500], transient=transient)
        return records


def _cut(res: LLMResult) -> bool:
    return bool(res.choices) and res.choices[0].finish_reason == "length"


def _strip_tags(text: str) -> str:
    """A summary without a reasoning model's ``<think>`` block (what follows the last ``</think>``)."""
    text = text or ""
    end = text.rfind("</think>")
    return text[end + len("</think>"):] if end >= 0 else text
