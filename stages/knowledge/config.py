"""The knowledge stage's settings (``stages.knowledge`` in a run config)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from gmner_pipeline.hashing import dir_sha256, file_sha256
from gmner_pipeline.prompts import prompt_hash, prompt_path
from gmner_pipeline.stage import StageConfig

from .ontology import TypeMapping, twitter_gmner_map
from .prompts import COMMON, template_file

# "N/A"-style answers: matched at the start of an answer, case-insensitively (vote.is_non_answer)
DEFAULT_NON_ANSWERS = [
    r"n\s*/?\s*a\b", r"none\b", r"null\b", r"unknown\b", r"not (?:applicable|available|known|specified|mentioned|"
    r"provided|given|sure|clear)\b", r"no (?:information|info|data|details|known|specific|visible|particular)\b",
    r"unclear\b", r"unspecified\b", r"i (?:do not|don't|cannot|can't) (?:know|tell|say)\b",
    r"(?:it )?(?:cannot|can't|could not) be determined\b", r"there is no\b", r"nothing\b", r"-+$", r"\?+$",
    # the prompts' own placeholders copied back, as small models do ("<one sentence, or N/A>", "one sentence ...")
    r"<", r"one sentence\b", r"one of the types above\b", r"the type most models chose\b",
]


class KnowledgeConfig(StageConfig):
    """Visual knowledge per entity from several LLMs, merged by a voter, summarised (docs/knowledge.md)."""

    batch_size: int = Field(256, ge=1, description="records per call in the join pass (cheap: no LLM calls there)")
    # --- roles (llm.roles.<name>; a role without endpoints gets the embedded server) ---
    generators: list[str] = Field(
        default_factory=lambda: ["knowledge_gen_1", "knowledge_gen_2", "knowledge_gen_3"],
        description="N >= 2 generator roles, ideally different models (VKEL: GPT-3.5-Turbo, Gemini Pro, LLaMA-3-70B)")
    voter: str = Field("knowledge_voter", description="the role that merges the generators' answers by meaning")
    summary: str = Field("knowledge_summary", description="the role that keeps the appearance-relevant part")
    # --- the vote ---
    min_generators: int = Field(2, ge=2, description="usable generator answers an entity needs; fewer: the records "
                                "mentioning it get an error")
    agreement: float = Field(0.5, gt=0, le=1, description="share of the answering generators that must state an "
                             "aspect for the voter to keep it")
    min_support: int = Field(2, ge=1, description="and at least this many (2: what only one model claims is dropped)")
    min_overlap: float = Field(0.34, ge=0, le=1, description="share of a voted sentence's content words that must "
                               "come from its supporters' answers (0: no check)")
    non_answers: list[str] = Field(default_factory=lambda: list(DEFAULT_NON_ANSWERS),
                                   description="regular expressions for N/A-style answers (never voted in)")
    # --- what is asked ---
    entities: Literal["gold", "predicted"] = Field(
        "gold", description="gold entities, or a stage-1 model's predictions (`predictions`) at evaluation time")
    predictions: str | None = Field(None, description="entities='predicted': a JSONL file or shards of predictions, "
                                    "as `gmner-pipeline eval --pred` reads them (its content is part of the key)")
    context: Literal["first_mention", "none"] = Field(
        "first_mention", description="first_mention: the tweet of the entity's first occurrence (smallest record id "
        "whose text contains it) tells the models which entity is meant; none: a sentence-free prompt")
    entity_key: Literal["exact", "casefold"] = Field(
        "exact", description="what makes two mentions the same entity (with the type): the text as written, or "
        "case-folded")
    type_map: dict[str, TypeMapping] = Field(
        default_factory=twitter_gmner_map, description="source type -> ontology coarse types (and template)")
    max_aspects: int | None = Field(None, ge=1, description="ask only the first N aspects of each template (faster)")
    structured_output: bool = Field(True, description="send json_schema response formats (tolerant parsing either "
                                    "way)")
    fine_type_enum: bool = Field(True, description="the generator schema lists the allowed fine types")
    # --- sizes ---
    generator_max_tokens: int = Field(384, ge=8)
    voter_max_tokens: int = Field(512, ge=8)
    summary_max_tokens: int = Field(160, ge=8, description="the summary's token budget")
    summary_words: int = Field(60, ge=5, description="the summary prompt asks for at most this many words")
    max_entity_chars: int = Field(120, ge=8, description="a longer entity string is not asked about (skipped with a "
                                  "note)")
    max_context_chars: int = Field(600, ge=0, description="the context tweet is cut to this many characters")
    max_answer_chars: int = Field(400, ge=20, description="each generator sentence is cut to this in the voter prompt")
    entities_in_flight: int = Field(32, ge=1, description="entities worked on at once per worker (each sends N "
                                    "generator requests, then one voter and one summary request)")

    @field_validator("generators")
    @classmethod
    def _at_least_two(cls, roles: list[str]) -> list[str]:
        if len(roles) < 2:
            raise ValueError(f"the knowledge stage needs at least 2 generator roles (got {roles}): the vote merges "
                             "different models' answers; add roles under stages.knowledge.generators and llm.roles")
        if len(set(roles)) != len(roles):
            raise ValueError(f"a generator role appears twice: {roles}")
        return roles

    @model_validator(mode="after")
    def _consistent(self) -> "KnowledgeConfig":
        if self.min_generators > len(self.generators):
            raise ValueError(f"min_generators ({self.min_generators}) is more than the {len(self.generators)} "
                             "generator roles")
        if self.entities == "predicted" and not self.predictions:
            raise ValueError("entities: predicted needs `predictions` (a JSONL file or shards of a stage-1 model's "
                             "predictions)")
        for source_type, mapping in self.type_map.items():
            try:
                prompt_path(template_file(mapping.template_name))
            except FileNotFoundError:
                raise ValueError(f"type_map.{source_type}: no knowledge template {mapping.template_name!r} (files in "
                                 "prompts/knowledge/: person, location, organization, building, product, art, event, "
                                 "other)") from None
        if set(self.generators) & {self.voter, self.summary}:
            raise ValueError("the voter and summary roles must not be generator roles (a model voting on its own "
                             "answer is not a vote)")
        return self

    def template_names(self) -> list[str]:
        return sorted({m.template_name for m in self.type_map.values()})

    def template_hash(self) -> str:
        return prompt_hash(COMMON, *(template_file(n) for n in self.template_names()))

    def key_payload(self) -> dict[str, Any]:
        """The stage key also covers the prompt files and the predictions' content."""
        payload = {**super().key_payload(), "template_hash": self.template_hash()}
        if self.entities == "predicted" and self.predictions:
            path = Path(self.predictions)
            payload["predictions_sha256"] = (file_sha256(path) if path.is_file() else dir_sha256(path)
                                             if path.is_dir() else None)
        return payload
