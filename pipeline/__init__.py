"""gmner-pipeline: distributed data synthesis for Grounded Multimodal Named Entity Recognition.

The repository's folders map into this one import package (see pyproject.toml):
``pipeline/`` is ``gmner_pipeline``, ``stages/`` is ``gmner_pipeline.stages``, ``prompts/`` is
``gmner_pipeline.prompts``, ``configs/`` is ``gmner_pipeline.configs`` and ``train/`` is ``gmner_pipeline.train``.
"""

__version__ = "0.1.0"
