"""Stage 5, GRPO filtering (MCR §4.2.2, App. D.3; method-spec §Stage 5): for every D2 record with a consistent chain,
sample G responses from the SFT policy with the student prompt GRPO will use, score each with the project's
verifiable reward (the GRPO trainer's), and keep the record only when its reward group is informative (std, max and
median thresholds), recording the first rule that dropped it. ``publish`` writes the kept records as
``dataset/D2_filtered``; the driver writes the filter report (``reports/grpo_filter.json`` and ``.png``).

Modules: ``groups`` (pure: which records, gold, rewards, statistics, the grpo column), ``policy`` (served over HTTP or
in-process), ``report`` (from the committed shards), ``stage`` (the Stage subclass and its config).
"""

from .stage import GrpoFilterStage, GrpoFilterStageConfig

__all__ = ["GrpoFilterStage", "GrpoFilterStageConfig"]
