"""The distill stage: multi-style reasoning chains that reach the gold answer (method-spec §Stage 4; docs/distill.md).

Per record (train records, and dev/test ones only with ``heldout_chains``):

* ``template`` chains are built from the gold labels (``template.py``);
* each teacher of the ``llm`` and ``mllm`` styles gets one request per route with ``n`` = ``chains`` (``prompts.py``),
  every answer is judged by the gold check (``check.py``) and a rejected one asked again (``teacher.py``);
* ``cot.split`` is the record's D1/D2 assignment from ``splits.dataset_split`` (None outside the training splits).

Chains of other styles already on the record are kept; this stage's styles replace their own. Every record of a batch
is worked on at once (``records_in_flight`` at most), so the teachers' endpoints get requests up to their
``max_concurrency`` across the whole batch (by default a whole shard).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from typing import Any

from gmner_pipeline.answer import Triple, gold_triples
from gmner_pipeline.frames import FrameConfig
from gmner_pipeline.hashing import stable_hash
from gmner_pipeline.llm.config import RoleConfig
from gmner_pipeline.prompts import load_yaml
from gmner_pipeline.schema import GROUNDING_ABSENT, GROUNDING_PRESENT
from gmner_pipeline.splits import DatasetConfig, dataset_split, is_training_record
from gmner_pipeline.stage import Record, Stage, StageSetupError, mark_error
from gmner_pipeline.student import image_size

from . import template as template_style
from .check import REASONS
from .config import DistillConfig, TeacherStyleConfig
from .prompts import Order, base_messages, encode_teacher_image, system_prompt, user_text
from .store import StyleStore, fingerprint, style_key, teacher_view
from .teacher import LLM_BAD_REQUEST, Job, TeacherUnavailable, run_job
from .variation import Draw, chain_seed, orders

SKIP_NOT_TRAINING = "not_training_split"
SKIP_GROUNDING_ABSENT = "grounding_absent"
SKIP_GROUNDING_UNKNOWN = "grounding_unknown"  # grounding_labels neither "present" nor "absent" (malformed record)


def start_cot(record: Record, settings: DistillConfig, dataset: DatasetConfig, run_seed: int) -> tuple[bool, str | None]:
    """The record-level rules, before any chain (pure): ``cot.split`` from ``splits.dataset_split``, the chains of
    styles this config does not write kept, and why the record gets no chain (a non-training split without
    ``heldout_chains``; grounding labels absent or malformed), else None. Returns (training record?, skipped)."""
    cot = dict(record.get("cot") or {})
    kept = [c for c in cot.get("chains") or [] if c.get("style") not in settings.styles]  # other styles stay
    training = is_training_record(record, dataset)
    cot.update(chains=kept, skipped=None, split=dataset_split(record, dataset, run_seed))
    record["cot"] = cot
    if not training and not settings.heldout_chains:  # dev/test: no gold-derived chains unless asked for
        cot["skipped"] = SKIP_NOT_TRAINING
    elif record.get("grounding_labels") != GROUNDING_PRESENT:  # visibility unknown: a chain would have to invent it
        cot["skipped"] = (SKIP_GROUNDING_ABSENT if record.get("grounding_labels") == GROUNDING_ABSENT
                          else SKIP_GROUNDING_UNKNOWN)
    return training, cot["skipped"]


def style_payload(settings: DistillConfig, run_seed: int, stage: str, version: str, style: str,
                  section: dict[str, Any], prompts: str) -> dict[str, Any]:
    """What every style's key holds (``store.style_key``); a teacher style adds its teacher's identity, sampling,
    n handling and frame, and mllm the image encoding."""
    s = settings
    return {"stage": stage, "version": version, "style": style, "section": section,
            "check": s.check.model_dump(mode="json"), "seed": run_seed, "seed_offset": s.seed_offset,
            "vary": [s.vary_triple_order, s.vary_field_order], "prompts": prompts}


def template_style_key(settings: DistillConfig, run_seed: int, stage: str, version: str) -> str:
    return style_key(style_payload(settings, run_seed, stage, version, "template",
                                   settings.template.model_dump(mode="json"), settings.template.prompt_hash()))


def template_chains(record: Record, settings: DistillConfig, run_seed: int, heldout: bool = False,
                    style_key_: str | None = None) -> list[dict[str, Any]]:
    """The template style's chains of one record (pure): ``template.chains`` per route, each with its own seed."""
    s = settings
    common = load_yaml(template_style.COMMON_TEMPLATE)
    out = []
    for route in s.template.routes:
        phrases = load_yaml(template_style.route_template(route))
        for index in range(s.template.chains):
            seed = chain_seed(run_seed, s.seed_offset, record["id"], route, index)
            chain, _ = template_style.build_chain(
                record, route, seed, vary_triple_order=s.vary_triple_order, vary_field_order=s.vary_field_order,
                use_fine_types=s.template.use_fine_types, common=common, route_phrases=phrases, check=s.check)
            chain.update(style_key=style_key_, prompt_tokens=None, completion_tokens=None, seconds=None, frame=None,
                         heldout=heldout)
            out.append(chain)
    return out


class ImageUnreadable(Exception):
    """The record's image is missing on disk or cannot be read: the mllm style cannot run on it."""


@dataclass(frozen=True)
class TeacherPlan:
    """One teacher of one style, resolved for this worker."""

    style: str
    teacher: str
    identity: str
    frame: FrameConfig
    config: TeacherStyleConfig
    key: str
    systems: dict[str, str]  # route -> system prompt


class DistillStage(Stage):
    """Template, llm and mllm chains, each kept only when it reaches the gold answer."""

    name = "distill"
    version = "1"
    Config = DistillConfig
    reads = frozenset()  # knowledge and detections are optional hints; the image only for the mllm style
    writes = frozenset({"cot"})

    config: DistillConfig
    _ready = False  # setup() ran (the framework calls it; a stage called without it sets itself up on first use)

    @classmethod
    def reads_for(cls, config: Any) -> frozenset[str]:
        return frozenset({"image"}) if "mllm" in config.distill_config().styles else frozenset()

    @classmethod
    def llm_roles(cls, config: Any) -> set[str]:
        return config.distill_config().roles()

    @classmethod
    def preflight(cls, config: Any) -> None:
        settings = config.distill_config()
        for style in settings.teacher_styles():
            table = load_yaml(settings.teacher_style(style).feedback_template)
            missing = [r for r in REASONS if r not in (table.get("problems") or {})]
            if "message" not in table or missing:
                raise StageSetupError(f"stages.{cls.name}.{style}.feedback_template: the file needs 'message' and a "
                                      f"'problems' entry for {missing or list(REASONS)}")

    # --- setup ------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        self.settings = self.config.distill_config()
        self.prompt_hash = stable_hash(self.settings.prompt_hashes())
        self.images = self.llm.config.images
        self.template_key = template_style_key(self.settings, self.context.seed, self.name, self.version)
        self.teachers = [self._teacher_plan(style, teacher) for style in self.settings.teacher_styles()
                         for teacher in self.settings.teacher_style(style).teachers]
        self.store = StyleStore(None)
        if self.teachers and self.settings.reuse:
            from gmner_pipeline.llm.cache import open_cache

            self.store = StyleStore(open_cache(self.llm.config.cache))
        self.model_ids = sorted({t.identity for t in self.teachers})
        self._ready = True

    def _teacher_plan(self, style: str, teacher: str) -> TeacherPlan:
        section = self.settings.teacher_style(style)
        role: RoleConfig = self.llm.role(teacher)
        identity = self.llm.identity(teacher)
        payload = style_payload(self.settings, self.context.seed, self.name, self.version, style,
                                section.model_dump(mode="json", exclude={"teachers"}), section.prompt_hash(style))
        payload["teacher"] = {"model": identity, "sampling": role.sampling.model_dump(mode="json"),
                              "n_mode": role.n_mode, "frame": role.frame.model_dump(mode="json")}
        if style == "mllm":
            payload["images"] = self.images.model_dump(mode="json")
        systems = {route: system_prompt(style, section.route_file(style, route), role.frame,
                                        self.settings.check.eval.types) for route in section.routes}
        return TeacherPlan(style, teacher, identity, role.frame, section, style_key(payload), systems)

    def close(self) -> None:
        store = getattr(self, "store", None)
        if store is not None:
            store.close()

    # --- per batch and record -------------------------------------------------------------------------------------

    async def aprocess(self, records: list[Record]) -> list[Record]:
        if not self._ready:
            self.setup()
        slots = asyncio.Semaphore(self.settings.records_in_flight)

        async def guarded(record: Record) -> Record:
            async with slots:
                return await self._record(record)

        return list(await asyncio.gather(*(guarded(r) for r in records)))

    async def _record(self, record: Record) -> Record:
        s = self.settings
        training, skipped = start_cot(record, s, self.context.dataset, self.context.seed)
        cot = record["cot"]
        kept = list(cot["chains"])
        if skipped:
            self.count(f"records:skipped:{skipped}")
            return record
        try:
            gold = tuple(gold_triples(record))
        except ValueError as exc:
            return mark_error(record, self.name, str(exc))
        heldout = not training
        if heldout:
            self.count("records:heldout_chains")
        chains = self._template_chains(record, heldout) if "template" in s.styles else []
        outcomes = await asyncio.gather(*(self._teacher_chains(t, record, gold, heldout) for t in self.teachers),
                                        return_exceptions=True)
        for plan, outcome in zip(self.teachers, outcomes):
            if isinstance(outcome, TeacherUnavailable):
                self.count(f"{plan.style}:teacher_unavailable")
                return mark_error(record, self.name, f"{plan.style} style: {outcome} (transient: rerun to retry; "
                                  "answers already received are in the request cache)",
                                  transient=outcome.result.transient)
            if isinstance(outcome, ImageUnreadable):
                self.count("records:image_unreadable")
                return mark_error(record, self.name, f"mllm style: {outcome}")
            if isinstance(outcome, BaseException):
                raise outcome  # a bug: the framework retries the record alone, then records the error
            chains += outcome
        for chain in chains:
            self._count_chain(chain)
        cot["chains"] = kept + chains
        return record

    def _count_chain(self, chain: dict[str, Any]) -> None:
        style = chain["style"]
        self.count(f"{style}:chains")
        if chain["consistent"]:
            self.count(f"{style}:consistent")
        else:
            self.count(f"{style}:rejected:{(chain.get('rejection') or 'unknown').split(':')[0]}")

    def _template_chains(self, record: Record, heldout: bool) -> list[dict[str, Any]]:
        return template_chains(record, self.settings, self.context.seed, heldout, self.template_key)

    def jobs(self, plan: TeacherPlan, view: dict[str, Any], gold: tuple[Triple, ...], heldout: bool,
             image_url: str | None = None) -> list[Job]:
        """The requests of one record for one teacher: one per route, ``n`` = chains, seeded, the triples and fields
        in their seeded order (also what ``benchmarks/distill.py`` sends through a raw openai loop)."""
        s = self.settings
        section = plan.config
        size = image_size(view)
        jobs = []
        for route in section.routes:
            seed = chain_seed(self.context.seed, s.seed_offset, view["id"], f"{plan.style}/{plan.teacher}/{route}", 0)
            order_, fields = orders(Draw(seed), len(gold), s.vary_triple_order, s.vary_field_order)
            text = user_text(view, gold, Order(tuple(order_), tuple(fields)), section, plan.frame)
            jobs.append(Job(plan.style, plan.teacher, plan.identity, route, seed, section.chains,
                            base_messages(plan.systems[route], text, image_url), gold, plan.frame, size, plan.key,
                            heldout, tag=view["id"]))
        return jobs

    async def _teacher_chains(self, plan: TeacherPlan, record: Record, gold: tuple[Triple, ...],
                              heldout: bool) -> list[dict[str, Any]]:
        section = plan.config
        view = teacher_view(record, knowledge=section.knowledge != "never", detections=section.detections != "never")
        size = image_size(view)
        if plan.style == "mllm" and not view["image"]["path"]:
            self.count("mllm:skipped:no_image")
            return []
        if plan.frame.kind != "original" and size is None:
            self.count(f"{plan.style}:skipped:no_image_size")
            return []
        store_key = self.store.key(plan.key, record["id"], fingerprint({**view, "heldout": heldout}))
        stored = self.store.get(store_key)
        if stored is not None:
            self.count(f"{plan.style}:reused")
            for event, n in (stored.get("events") or {}).items():
                self.count(f"{plan.style}:{event}", n)
            self.usage(record, model_ids=[plan.identity])
            return stored["chains"]

        image_url = None
        if plan.style == "mllm":
            try:  # PIL decodes and encodes off the event loop, so requests keep flowing meanwhile
                image_url = await asyncio.to_thread(encode_teacher_image, view["image"]["path"], plan.frame,
                                                    self.images, size)
            except ValueError as exc:
                raise ImageUnreadable(str(exc)) from None
        jobs = self.jobs(plan, view, gold, heldout, image_url)
        client = self.llm.client(plan.teacher)
        outcomes = await asyncio.gather(*(run_job(client, job, section, self.settings.check) for job in jobs),
                                        return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        chains = [c for o in outcomes for c in o.chains]
        events: Counter[str] = Counter()
        for o in outcomes:
            events.update({k: v for k, v in o.events.items() if not k.startswith("rejected:")})
        for event, n in events.items():
            self.count(f"{plan.style}:{event}", n)
        self.usage(record, results=[r for o in outcomes for r in o.results])
        self.store.put(store_key, {"chains": chains, "events": dict(events), "model_ids": [plan.identity]})
        return chains


__all__ = ["DistillStage", "LLM_BAD_REQUEST", "SKIP_GROUNDING_ABSENT", "SKIP_GROUNDING_UNKNOWN",
           "SKIP_NOT_TRAINING"]
