"""Where gmner-pipeline keeps files of its own outside a run's output folder."""

from __future__ import annotations

import os
from pathlib import Path


def user_cache_dir(*parts: str) -> Path:
    """``$XDG_CACHE_HOME/gmner-pipeline/<parts>`` (default ``~/.cache/gmner-pipeline/<parts>``): fetched models, the
    LLM request cache, image stores and corpus indexes when no better place is configured."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base.joinpath("gmner-pipeline", *parts)
