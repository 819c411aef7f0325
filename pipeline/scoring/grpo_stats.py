"""GRPO data filtering by reward statistics (MCR App. D.3; method-spec §Stage 5).

Per item, from the rewards of its G sampled responses: mean, std (population by default), max, median. The item is kept
iff std >= min_std, max >= min_max and median_low <= median <= median_high; otherwise the FIRST failing rule, in that
order, is recorded as the reason. ``filter_report`` gives the dataset-level view: how many items each rule removed
(first failing rule, and every failing rule), and histograms of the four statistics; ``plot_histograms`` draws them.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..atomic import atomic_open
from ..storage import location
from .config import GrpoFilterConfig

log = logging.getLogger(__name__)

RULES = ("low_std", "low_max", "median_below", "median_above")
# The bounds are inclusive, but rewards are weighted sums (0.2 + 0.2 + 0.2 = 0.6000000000000001) and shards store them
# as float32 (0.6 -> 0.6000000238): a statistic within this of a bound counts as on it, so a median of "0.6" is kept.
TOLERANCE = 1e-6
STATS = ("mean", "std", "max", "median")


@dataclass(frozen=True)
class GroupStats:
    mean: float | None
    std: float | None
    max: float | None
    median: float | None
    n: int  # valid (finite) rewards used
    keep: bool
    reason: str | None  # the first rule that dropped the item, else None
    failed: tuple[str, ...] = ()  # every rule the item fails

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def group_stats(rewards: Sequence[float | None], config: GrpoFilterConfig | None = None) -> GroupStats:
    """Statistics of one item's G rewards and the keep decision. None / NaN rewards are left out (counted in n)."""
    config = config or GrpoFilterConfig()
    values = np.array([float(r) for r in rewards if r is not None and math.isfinite(float(r))], dtype=np.float64)
    if len(values) < config.min_group:
        return GroupStats(None, None, None, None, len(values), False, "too_few_rewards", ("too_few_rewards",))
    ddof = 0 if config.std == "population" else 1
    mean, std = float(values.mean()), float(values.std(ddof=ddof))
    top, median = float(values.max()), float(np.median(values))
    failed = tuple(rule for rule, bad in (
        ("low_std", std < config.min_std - TOLERANCE),
        ("low_max", top < config.min_max - TOLERANCE),
        ("median_below", median < config.median_low - TOLERANCE),
        ("median_above", median > config.median_high + TOLERANCE),
    ) if bad)
    return GroupStats(mean, std, top, median, len(values), not failed, failed[0] if failed else None, failed)


def grpo_column(responses: Sequence[str], rewards: Sequence[float | None], policy_id: str | None,
                config: GrpoFilterConfig | None = None) -> dict[str, Any]:
    """The record's ``grpo`` struct (pipeline/schema.py GRPO) for one item."""
    s = group_stats(rewards, config)
    return {"policy_id": policy_id, "responses": list(responses),
            "rewards": [None if r is None else float(r) for r in rewards],
            "mean": s.mean, "std": s.std, "max": s.max, "median": s.median, "keep": s.keep, "reason": s.reason}


def stats_from_records(records: Iterable[dict[str, Any]], config: GrpoFilterConfig | None = None) -> list[GroupStats]:
    """Recompute every item's statistics from the rewards stored in its ``grpo`` column, so that a report can be
    redrawn, or the thresholds tried out, without sampling again. Records without one are skipped, and so are error
    records (a group whose sampling failed is kept in its record for inspection, but is not a filter decision)."""
    return [group_stats(rec["grpo"].get("rewards") or [], config) for rec in records
            if rec.get("grpo") and rec.get("status", "ok") == "ok"]


def filter_report(stats: Iterable[GroupStats], config: GrpoFilterConfig | None = None) -> dict[str, Any]:
    """Dataset-level summary: kept count, removals by first failing rule and by any failing rule, histograms."""
    config = config or GrpoFilterConfig()
    stats = list(stats)
    first = Counter(s.reason for s in stats if s.reason)
    anyrule = Counter(rule for s in stats for rule in s.failed)
    edges = np.linspace(0.0, 1.0, config.histogram_bins + 1)
    hist = {}
    for name in STATS:
        vals = np.array([getattr(s, name) for s in stats if getattr(s, name) is not None], dtype=np.float64)
        kept_vals = np.array([getattr(s, name) for s in stats if s.keep], dtype=np.float64)
        counts, _ = np.histogram(np.clip(vals, 0.0, 1.0), bins=edges)
        kept_counts, _ = np.histogram(np.clip(kept_vals, 0.0, 1.0), bins=edges)
        hist[name] = {"counts": counts.tolist(), "kept_counts": kept_counts.tolist(), "summary": _summary(vals)}
    kept = sum(s.keep for s in stats)
    return {
        "items": len(stats), "kept": kept, "dropped": len(stats) - kept,
        "kept_fraction": kept / len(stats) if stats else 0.0,
        "dropped_by_first_rule": {r: first.get(r, 0) for r in ("too_few_rewards", *RULES)},
        "failing_each_rule": {r: anyrule.get(r, 0) for r in ("too_few_rewards", *RULES)},
        "rules": {"low_std": f"std < {config.min_std:g} ({config.std})", "low_max": f"max < {config.min_max:g}",
                  "median_below": f"median < {config.median_low:g}", "median_above": f"median > {config.median_high:g}",
                  "too_few_rewards": f"fewer than {config.min_group} valid rewards"},
        "histogram_edges": edges.tolist(),
        "histograms": hist,
    }


def _summary(vals: np.ndarray) -> dict[str, float | None]:
    if not len(vals):
        return {"min": None, "p25": None, "median": None, "p75": None, "max": None}
    q = np.quantile(vals, [0.0, 0.25, 0.5, 0.75, 1.0])
    return dict(zip(("min", "p25", "median", "p75", "max"), (float(v) for v in q)))


def plot_histograms(report: dict[str, Any], path: str | Path, config: GrpoFilterConfig | None = None) -> Path:
    """A PNG with the four statistic histograms and the filter thresholds drawn on them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = config or GrpoFilterConfig()
    edges = np.array(report["histogram_edges"])
    lines = {"std": [config.min_std], "max": [config.min_max], "median": [config.median_low, config.median_high]}
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5), constrained_layout=True)
    for ax, name in zip(axes, STATS):
        h = report["histograms"][name]
        ax.bar(edges[:-1], h["counts"], width=np.diff(edges), align="edge", color="#A1B8D8", edgecolor="white",
               label="all items")
        ax.bar(edges[:-1], h["kept_counts"], width=np.diff(edges), align="edge", color="#2E5A9C", edgecolor="white",
               label="kept")
        for x in lines.get(name, []):
            ax.axvline(x, color="#C44E52", linestyle="--", linewidth=1.2)
        ax.set_title(f"reward {name} per item")
        ax.set_xlim(0, 1)
        ax.set_xlabel(name)
    axes[0].set_ylabel("items")
    axes[0].legend(loc="upper right", fontsize=8)
    fig.suptitle(f"GRPO filter: kept {report['kept']} of {report['items']} items (dashed: thresholds)")
    path = location(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as fh:  # a local file or one object PUT (storage.py)
        fig.savefig(fh, dpi=110, format="png")
    plt.close(fig)
    log.info("wrote %s", path)
    return path
