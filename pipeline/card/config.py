"""The ``card:`` section of a run config: what the dataset card at ``<output>/README.md`` shows beyond the run's own
facts (a title, a licence), whether it draws plots, and the price of each LLM role for the cost table."""

from __future__ import annotations

from pydantic import Field

from ..configbase import Strict


class Price(Strict):
    """What one LLM role costs per million tokens (what your provider bills, or a GPU-hour estimate)."""

    input_per_1m: float = Field(..., ge=0, description="price of one million prompt tokens")
    output_per_1m: float = Field(..., ge=0, description="price of one million completion tokens")


class CardConfig(Strict):
    """The dataset card every complete run writes (``gmner-pipeline card <output>`` rewrites it)."""

    enabled: bool = Field(True, description="write <output>/README.md and its plots at the end of every run")
    plots: bool = Field(True, description="draw the PNG plots under <output>/card/ (matplotlib)")
    title: str | None = Field(None, description="the card's title (default: from the source's name)")
    license: str | None = Field(None, description="the card's licence field (e.g. cc-by-4.0); the source's terms "
                                "apply to the texts and images")
    currency: str = Field("USD", description="the currency of the prices")
    prices: dict[str, Price] = Field(default_factory=dict, description="per LLM role (as under llm.roles): its "
                                     "price per million prompt / completion tokens, for the card's cost table")
