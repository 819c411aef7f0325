"""Stage 4, multi-style CoT distillation: template, llm and mllm chains that reach the gold answer (docs/distill.md).

Modules, each with one job: ``variation`` (seeds and orders), ``template`` (programmatic chains), ``check`` (the gold
check every chain passes), ``prompts`` (teacher prompts), ``teacher`` (ask, judge, re-ask), ``store`` (per-style keys
and the style store), ``compare`` (``gmner-pipeline teachers``), ``config`` and ``stage`` (the ``Stage``).
"""

from .config import DistillConfig
from .stage import DistillStage

__all__ = ["DistillConfig", "DistillStage"]
