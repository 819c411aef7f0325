"""``template_cot``: the template style of the ``distill`` stage under its first name and config keys.

Chain building, the gold check, the seeded variation and the D1/D2 assignment live in ``stages/distill/`` (one home for
every style); this stage is ``distill`` with ``styles: [template]``, kept so that configs written for it still run
(``pipeline: [template_cot]``, ``stages.template_cot.routes`` / ``chains_per_route``). New configs use ``distill``.
The names below are re-exported for code written against this module.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from gmner_pipeline.answer import gold_triples
from gmner_pipeline.splits import DatasetConfig
from gmner_pipeline.stage import Record, StageConfig

from .distill.check import CheckConfig, check_turn
from .distill.config import DistillConfig, TemplateStyleConfig
from .distill.stage import (
    SKIP_GROUNDING_ABSENT, SKIP_GROUNDING_UNKNOWN, SKIP_NOT_TRAINING, DistillStage, start_cot, template_chains,
    template_style_key,
)
from .distill.template import (
    COMMON_TEMPLATE, ROUTES, STYLE, Route, Variation, build_chain, mentions_of, route_template, template_hash,
)
from .distill.variation import FIELDS, Draw, chain_seed

__all__ = ["COMMON_TEMPLATE", "FIELDS", "ROUTES", "SKIP_GROUNDING_ABSENT", "SKIP_GROUNDING_UNKNOWN",
           "SKIP_NOT_TRAINING", "STYLE", "Draw", "TemplateCoTConfig", "TemplateCoTStage", "Variation", "build_chain",
           "chain_seed", "check_chain", "mentions_of", "route_template", "template_cot"]


def check_chain(turn: str, record: Record, check: CheckConfig | None = None) -> tuple[bool, str | None]:
    """The gold check of one assistant turn against a record: ``(consistent, rejection)``."""
    verdict = check_turn(turn, gold_triples(record), config=check)
    return verdict.consistent, verdict.rejection


class TemplateCoTConfig(StageConfig):
    routes: list[Route] = Field(default_factory=lambda: list(ROUTES), min_length=1,
                                description="reasoning routes (step orders); one set of chains per route")
    chains_per_route: int = Field(1, ge=1, le=16, description="chains per route and record, each with its own seed")
    seed_offset: int = Field(0, description="added to the run seed (run.seed) for this stage's draws")
    vary_triple_order: bool = Field(True, description="seeded order of the triples (reasoning and answer)")
    vary_field_order: bool = Field(True, description="seeded order of entity/type/location in the summary lines")
    use_fine_types: bool = Field(True, description="mention an entity's fine type (when the record has one) in the "
                                 "type step; the answer keeps the coarse type")
    heldout_chains: bool = Field(False, description="also write chains for dev/test records, marked heldout; they "
                                 "never enter D1/D2")
    check: CheckConfig = Field(default_factory=CheckConfig, description="the gold check (distill's)")

    @field_validator("routes")
    @classmethod
    def _distinct(cls, routes: list[str]) -> list[str]:
        if len(set(routes)) != len(routes):
            raise ValueError(f"a route appears twice: {routes}")
        return routes

    def distill_config(self) -> DistillConfig:
        return DistillConfig(
            styles=["template"], resources=self.resources, batch_size=self.batch_size,
            template=TemplateStyleConfig(routes=self.routes, chains=self.chains_per_route,
                                         use_fine_types=self.use_fine_types),
            check=self.check, seed_offset=self.seed_offset, vary_triple_order=self.vary_triple_order,
            vary_field_order=self.vary_field_order, heldout_chains=self.heldout_chains)

    def template_hash(self) -> str:
        return template_hash(self.routes)

    def key_payload(self) -> dict[str, Any]:
        """The stage key also covers the template files: editing a phrase recomputes the chains on the next run."""
        return {**super().key_payload(), "template_hash": self.template_hash()}


def template_cot(record: Record, config: TemplateCoTConfig, run_seed: int,
                 dataset: DatasetConfig | None = None) -> Record:
    """Add template chains to one active record, as the stage does (pure apart from reading the cached template
    files): ``cot.split`` from ``splits.dataset_split``, no chain for dev/test records unless ``heldout_chains``."""
    settings = config.distill_config()
    training, skipped = start_cot(record, settings, dataset or DatasetConfig(), run_seed)
    if not skipped:
        key = template_style_key(settings, run_seed, TemplateCoTStage.name, TemplateCoTStage.version)
        record["cot"]["chains"] += template_chains(record, settings, run_seed, heldout=not training, style_key_=key)
    return record


class TemplateCoTStage(DistillStage):
    """Deterministic template chains from gold labels; needs no model, no GPU and no network."""

    name = "template_cot"
    version = "3"  # 3: built by distill; dev/test records get no chains unless heldout_chains
    Config = TemplateCoTConfig
