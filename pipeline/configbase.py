"""What every typed config shares: the strict pydantic base (unknown keys are errors) and ``ConfigError``.

A module of its own so that the config models of the run, the stages, the LLM layer and scoring can all use them
without importing each other.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """The config cannot be used; the message says where and what to do."""


class Strict(BaseModel):
    """Base of every config model: an unknown key is an error (with its path), never silently ignored."""

    model_config = ConfigDict(extra="forbid")


class Frozen(Strict):
    """A strict config that cannot change after validation (scoring rules, prompt and frame settings: their hash is
    part of a key)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
