"""The FMNERG fine-type ontology (Wang et al. 2023; method-spec §Fine-type ontology) and how a source's coarse types
map onto it.

Eight coarse types with 51 fine types. A source's coarse type (Twitter-GMNER's PER/LOC/ORG/OTHER) maps to one or
more ontology coarse types (``TypeMapping``, a config table): the fine type an LLM proposes must be one of the fine
types of those coarse types, and the knowledge template is the mapping's ``template`` (default: its first coarse
type). The project's decision for Twitter-GMNER: PER -> person, LOC -> location, ORG -> organization, OTHER -> the
union of building, product, art, event and other, asked with the ``other`` template (appearance and background).
"""

from __future__ import annotations

from typing import Iterable

from pydantic import Field, field_validator

from gmner_pipeline.configbase import Strict

FMNERG: dict[str, tuple[str, ...]] = {
    "location": ("city", "country", "state", "continent", "location_other", "park", "road"),
    "building": ("building_other", "cultural_place", "entertainment_place", "sports_facility"),
    "organization": ("company", "educational_institution", "band", "government_agency", "news_agency",
                     "organization_other", "political_party", "social_organization", "sports_league", "sports_team"),
    "person": ("politician", "musician", "actor", "artist", "athlete", "author", "businessman", "character", "coach",
               "director", "intellectual", "journalist", "person_other"),
    "other": ("animal", "award", "medical_thing", "website", "ordinance"),
    "art": ("art_other", "film_and_television_works", "magazine", "music", "written_work"),
    "event": ("event_other", "festival", "sports_event"),
    "product": ("brand_name_products", "game", "product_other", "software"),
}
COARSE_TYPES: tuple[str, ...] = tuple(FMNERG)


class TypeMapping(Strict):
    """What one source type means in the ontology."""

    coarse: list[str] = Field(..., min_length=1, description="ontology coarse types the source type covers")
    template: str | None = Field(None, description="knowledge template (prompts/knowledge/<name>.yaml); default: the "
                                 "first coarse type")

    @field_validator("coarse")
    @classmethod
    def _known(cls, coarse: list[str]) -> list[str]:
        unknown = [c for c in coarse if c not in FMNERG]
        if unknown:
            raise ValueError(f"unknown ontology coarse type(s) {unknown}; the FMNERG ontology has {list(FMNERG)}")
        if len(set(coarse)) != len(coarse):
            raise ValueError(f"a coarse type appears twice: {coarse}")
        return coarse

    @property
    def template_name(self) -> str:
        return self.template or self.coarse[0]

    def fine_types(self) -> tuple[str, ...]:
        """The allowed fine types, in ontology order (coarse type by coarse type)."""
        return tuple(f for c in self.coarse for f in FMNERG[c])


def twitter_gmner_map() -> dict[str, TypeMapping]:
    """The project's decision for Twitter-GMNER's four types (method-spec §Fine-type ontology)."""
    return {
        "PER": TypeMapping(coarse=["person"]),
        "LOC": TypeMapping(coarse=["location"]),
        "ORG": TypeMapping(coarse=["organization"]),
        "OTHER": TypeMapping(coarse=["building", "product", "art", "event", "other"], template="other"),
    }


def normalise_fine_type(value: object) -> str:
    """How a proposed fine type is compared: lower case, spaces and hyphens as underscores ("Sports Team")."""
    return "_".join(str(value).strip().strip("\"'.").lower().replace("-", " ").split())


def validate_fine_type(value: object, allowed: Iterable[str]) -> str | None:
    """The allowed fine type ``value`` names (after ``normalise_fine_type``), or None when it names none."""
    if value is None or not isinstance(value, str) or not value.strip():
        return None
    wanted = normalise_fine_type(value)
    return wanted if wanted in set(allowed) else None
