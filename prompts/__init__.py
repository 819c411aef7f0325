"""Prompt templates live here as files, versioned by content hash (recorded in each record's lineage)."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import yaml

PROMPTS_DIR = Path(__file__).resolve().parent


def prompt_path(name: str) -> Path:
    path = PROMPTS_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"prompt template {name!r} not found under {PROMPTS_DIR}")
    return path


@lru_cache(maxsize=None)
def load_text(name: str) -> str:
    return prompt_path(name).read_text(encoding="utf-8")


@lru_cache(maxsize=None)
def load_yaml(name: str) -> dict:
    return yaml.safe_load(load_text(name))


def prompt_hash(*names: str) -> str:
    """sha256 (first 16 hex) over the named template files: changes whenever a template's text changes."""
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode())
        h.update(load_text(name).encode())
    return h.hexdigest()[:16]
