"""Stage 3: visual knowledge per entity from several LLMs, merged by a semantic voter, summarised (docs/knowledge.md)."""

from .config import KnowledgeConfig
from .stage import KnowledgeStage

__all__ = ["KnowledgeConfig", "KnowledgeStage"]
