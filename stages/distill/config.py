"""The distill stage's config (``stages.distill``): which styles run, each style's routes, teachers and re-asking, the
gold check, variation, held-out splits. Everything except the run-time knobs (``resources``, ``reuse``,
``records_in_flight``) keys the stage's output, and the sections of styles that do not run are left out of the key."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from gmner_pipeline.configbase import Strict
from gmner_pipeline.prompts import prompt_hash
from gmner_pipeline.stage import StageConfig

from .check import CheckConfig
from .template import ROUTES as TEMPLATE_ROUTES
from .template import Route as TemplateRoute
from .template import template_hash

Style = Literal["template", "llm", "mllm"]
STYLES: tuple[str, ...] = ("template", "llm", "mllm")
LLM_ROUTES = ("question_answer", "few_conclusions")
MLLM_ROUTES = ("distilled",)
SYSTEM_PROMPT = "distill/system.txt"
USER_PROMPT = "distill/user.txt"
FEEDBACK_PROMPT = "distill/feedback.yaml"
ORDER_PROMPT = "distill/order.yaml"


def _distinct(values: list[str], what: str) -> list[str]:
    if len(set(values)) != len(values):
        raise ValueError(f"a {what} appears twice: {values}")
    return values


class TemplateStyleConfig(Strict):
    """Programmatic chains from the gold labels (no model)."""

    routes: list[TemplateRoute] = Field(default_factory=lambda: list(TEMPLATE_ROUTES), min_length=1,
                                        description="step orders: entity_first, constraint_first")
    chains: int = Field(1, ge=1, le=16, description="chains per route and record, each with its own seed")
    use_fine_types: bool = Field(True, description="name an entity's fine type (when the record has one) in the "
                                 "type step; the answer keeps the coarse type")

    @field_validator("routes")
    @classmethod
    def _unique_routes(cls, v: list[str]) -> list[str]:
        return _distinct(v, "route")

    def prompt_hash(self) -> str:
        return template_hash(self.routes)


class TeacherStyleConfig(Strict):
    """A style whose chains a served model writes (``llm``: text only; ``mllm``: with the image)."""

    teachers: list[str] = Field(min_length=1, description="LLM roles (keys of llm.roles) that write chains; each "
                                "keeps its consistent chains under its own model id")
    routes: list[str] = Field(min_length=1, description="prompt routes (files under prompts/distill/<style>/)")
    chains: int = Field(1, ge=1, le=16, description="chains per route, teacher and record: sent as ONE request "
                        "with n (the client tops up with seeded requests where a server ignores n)")
    max_attempts: int = Field(3, ge=1, le=10, description="tries per chain: a rejected chain is asked again until "
                              "it is consistent or this many tries were made")
    feedback: bool = Field(True, description="re-ask inside the conversation: the rejected answer and a message "
                           "saying what was wrong (feedback_template); false: sample again with a new seed")
    feedback_template: str = Field(FEEDBACK_PROMPT, description="the retry messages, a YAML file under prompts/")
    knowledge: Literal["auto", "never"] = Field("auto", description="auto: the entity knowledge (knowledge stage) "
                                                "as a hint when the record has it")
    detections: Literal["auto", "never"] = Field("auto", description="auto: the detector's boxes (annotate stage) "
                                                 "as a hint when the record has them")
    max_detections: int = Field(5, ge=0, description="detector boxes shown at most (VKEL: top 5)")

    @field_validator("teachers")
    @classmethod
    def _unique_teachers(cls, v: list[str]) -> list[str]:
        return _distinct(v, "teacher")

    @field_validator("routes")
    @classmethod
    def _unique_routes(cls, v: list[str]) -> list[str]:
        return _distinct(v, "route")

    def route_file(self, style: str, route: str) -> str:
        return f"distill/{style}/{route}.txt"

    def prompt_files(self, style: str) -> list[str]:
        return [SYSTEM_PROMPT, USER_PROMPT, ORDER_PROMPT, f"distill/{style}/style.txt", self.feedback_template,
                *(self.route_file(style, r) for r in self.routes)]

    def prompt_hash(self, style: str) -> str:
        return prompt_hash(*self.prompt_files(style))


class LLMStyleConfig(TeacherStyleConfig):
    """A text-only teacher: sentence, gold triples, the four constraints, knowledge and detector hints."""

    teachers: list[str] = Field(default_factory=lambda: ["teacher"], min_length=1,
                                description="LLM roles (keys of llm.roles) that write llm-style chains")
    routes: list[Literal["question_answer", "few_conclusions"]] = Field(
        default_factory=lambda: list(LLM_ROUTES), min_length=1,
        description="question_answer and/or few_conclusions (MCR App. C's two LLM routes)")


class MLLMStyleConfig(TeacherStyleConfig):
    """A multimodal teacher: the image, the sentence, the gold triples and the same optional hints."""

    teachers: list[str] = Field(default_factory=lambda: ["vlm_teacher"], min_length=1,
                                description="LLM roles serving image-capable models (several: E2E-GMNER compared "
                                "three teachers); set each role's frame")
    routes: list[Literal["distilled"]] = Field(default_factory=lambda: list(MLLM_ROUTES), min_length=1,
                                               description="distilled (MCR App. C's distilled MLLM instruction)")


class DistillConfig(StageConfig):
    """``stages.distill``: see docs/distill.md."""

    styles: list[Style] = Field(default_factory=lambda: ["template", "llm"], min_length=1,
                                description="the styles to write: template (no model), llm (text-only teacher), "
                                "mllm (multimodal teacher; needs images and an image-capable endpoint)")
    template: TemplateStyleConfig = Field(default_factory=TemplateStyleConfig)
    llm: LLMStyleConfig = Field(default_factory=LLMStyleConfig)
    mllm: MLLMStyleConfig = Field(default_factory=MLLMStyleConfig)
    check: CheckConfig = Field(default_factory=CheckConfig, description="the gold check every chain passes")
    seed_offset: int = Field(0, description="added to run.seed in every chain's and request's seed")
    vary_triple_order: bool = Field(True, description="seeded order of the triples (reasoning and answer)")
    vary_field_order: bool = Field(True, description="seeded order of entity/type/location in per-entity "
                                   "conclusions (the answer keeps entity|TYPE|location)")
    heldout_chains: bool = Field(False, description="also write gold-derived chains for records outside "
                                 "dataset.training_splits (dev, test), marked heldout; they never enter D1/D2")
    reuse: bool = Field(True, description="take a teacher style's chains from the style store (llm.cache) when its "
                        "style key and the record's inputs are unchanged, so that a new teacher for one style "
                        "re-requests nothing for the others (not part of the key)")
    records_in_flight: int = Field(256, ge=1, description="records worked on at once within a batch (bounds the "
                                   "images held in memory); the endpoints' max_concurrency bounds the requests")
    batch_size: int = Field(512, ge=1, description="records per call of the stage: a whole default shard, so the "
                            "requests of every record of a shard are in flight together")

    @field_validator("styles")
    @classmethod
    def _unique_styles(cls, v: list[str]) -> list[str]:
        return _distinct(v, "style")

    def distill_config(self) -> "DistillConfig":
        return self

    def teacher_style(self, style: str) -> TeacherStyleConfig:
        return self.llm if style == "llm" else self.mllm

    def teacher_styles(self) -> list[str]:
        return [s for s in self.styles if s != "template"]

    def roles(self) -> set[str]:
        return {t for s in self.teacher_styles() for t in self.teacher_style(s).teachers}

    def prompt_hashes(self) -> dict[str, str]:
        return {s: (self.template.prompt_hash() if s == "template" else self.teacher_style(s).prompt_hash(s))
                for s in self.styles}

    def key_payload(self) -> dict[str, Any]:
        """Everything that shapes the chains: the styles that run (not the sections of those that do not), the
        check, the variation and the prompt files' hashes (editing a prompt recomputes the stage)."""
        payload = self.model_dump(mode="json", exclude={"resources", "reuse", "records_in_flight"})
        for style in STYLES:
            if style not in self.styles:
                payload.pop(style)
        payload["prompt_hashes"] = self.prompt_hashes()
        return payload
