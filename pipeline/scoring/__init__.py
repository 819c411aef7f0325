"""Scoring: GMNER evaluation with bias metrics, MCR verifiable rewards, and GRPO reward-statistics filtering.

Pure functions over triples (``gmner_pipeline.answer.Triple``); shared by ``gmner-pipeline eval``, the grpo-filter
stage and the GRPO trainer. The reward entry points are ``gmner_reward(completion, gold, RewardConfig())`` and
``make_trl_reward(RewardConfig())``. Rules and formulas: docs/scoring.md.
"""

from .boxes import iou, location_iou
from .config import EvalConfig, GrpoFilterConfig, RewardConfig
from .evaluate import EvalReport, Sample, evaluate, matches_gold
from .grpo_stats import GroupStats, filter_report, group_stats, grpo_column, plot_histograms, stats_from_records
from .rewards import COMPONENTS, RewardBreakdown, gmner_reward, make_trl_reward, read_gold, reward_components

__all__ = [
    "COMPONENTS", "EvalConfig", "EvalReport", "GroupStats", "GrpoFilterConfig", "RewardBreakdown", "RewardConfig",
    "Sample",
    "evaluate", "filter_report", "gmner_reward", "group_stats", "grpo_column", "iou", "location_iou",
    "make_trl_reward", "matches_gold", "plot_histograms", "read_gold", "reward_components", "stats_from_records",
]
