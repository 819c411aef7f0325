"""Stage 1 (VKEL): pair text-only NER sentences with retrieved images kept by CLIP similarity. See docs/retrieve.md."""

from .config import RetrieveConfig
from .stage import RetrieveStage

__all__ = ["RetrieveConfig", "RetrieveStage"]
