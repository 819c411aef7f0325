"""The stage registry: stage name -> ``"module:Class"``, imported lazily so that a run only imports (and needs the
dependencies of) the stages it uses. Add a stage by adding one line here; no hidden global registration.
"""

from __future__ import annotations

import importlib

from gmner_pipeline.stage import Stage

STAGES: dict[str, str] = {
    "annotate": "gmner_pipeline.stages.annotate:AnnotateStage",
    "template_cot": "gmner_pipeline.stages.template_cot:TemplateCoTStage",
}

# The order stages run in when several are configured (the stage graph is a chain; see README).
CANONICAL_ORDER = ["retrieve", "annotate", "knowledge", "template_cot", "distill", "grpo_filter"]


class UnknownStage(KeyError):
    pass


def load_stage(name: str) -> type[Stage]:
    try:
        target = STAGES[name]
    except KeyError:
        raise UnknownStage(f"unknown stage {name!r}; known stages: {', '.join(sorted(STAGES))}") from None
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)
