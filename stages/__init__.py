"""The stage registry: stage name -> ``"module:Class"``, imported lazily so that a run only imports (and needs the
dependencies of) the stages it uses. Add a stage by adding one line here; no hidden global registration.
"""

from __future__ import annotations

import importlib

from gmner_pipeline.stage import Stage

STAGES: dict[str, str] = {
    "retrieve": "gmner_pipeline.stages.retrieve:RetrieveStage",
    "annotate": "gmner_pipeline.stages.annotate:AnnotateStage",
    "knowledge": "gmner_pipeline.stages.knowledge:KnowledgeStage",
    "template_cot": "gmner_pipeline.stages.template_cot:TemplateCoTStage",
    "distill": "gmner_pipeline.stages.distill:DistillStage",
    "grpo_filter": "gmner_pipeline.stages.grpo_filter:GrpoFilterStage",
    "passthrough": "gmner_pipeline.stages.passthrough:PassthroughStage",
}


class UnknownStage(KeyError):
    pass


def is_known(name: str) -> bool:
    """A registered name, or a plugin given as ``"package.module:Class"`` (a Stage subclass importable on every
    Ray node), so users can add stages without editing this package."""
    return name in STAGES or (":" in name and all(name.split(":")))


def load_stage(name: str) -> type[Stage]:
    if name in STAGES:
        target = STAGES[name]
    elif is_known(name):
        target = name
    else:
        raise UnknownStage(f"unknown stage {name!r}; known stages: {', '.join(sorted(STAGES))} "
                           "(or a plugin as 'package.module:Class')")
    module_name, class_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, Stage)):
        raise UnknownStage(f"{target} is not a gmner_pipeline.stage.Stage subclass")
    return cls
