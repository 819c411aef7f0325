"""The filter report of a grpo_filter output, from its committed shards: how many items each rule removed, the
distributions of the group statistics (``scoring.filter_report``), the PNG histograms, and what the stage counted
(samples, responses zeroed by each reward rule, records not sampled).

Written by the driver once every shard of the stage is committed (``GrpoFilterStage.after_run``), into
``<output>/reports/grpo_filter.json`` and ``grpo_filter.png``; ``gmner-pipeline grpo-report`` redraws it with other
thresholds without sampling again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gmner_pipeline.schema import STATUS_OK
from gmner_pipeline.scoring import GrpoFilterConfig, filter_report, group_stats, plot_histograms
from gmner_pipeline.shards import iter_committed_records, write_json_atomic
from gmner_pipeline.storage import location
from gmner_pipeline.summary import stage_totals

from .groups import INCOMPLETE

REPORT_DIR = "reports"
REPORT_NAME = "grpo_filter"
_COLUMNS = ["id", "status", "grpo"]


def build_report(stage_dir: str | Path, config: GrpoFilterConfig | None = None) -> dict[str, Any]:
    """The report of the groups in ``stage_dir``. Items are the complete groups (records with status ok and a grpo
    column); groups with a failed request are counted apart (``incomplete_groups``), never as filter decisions."""
    config = config or GrpoFilterConfig()
    stats, incomplete = [], 0
    for record in iter_committed_records(stage_dir, columns=_COLUMNS):
        group = record.get("grpo")
        if not group:
            continue
        if record.get("status") != STATUS_OK or group.get("reason") == INCOMPLETE:
            incomplete += 1
            continue
        stats.append(group_stats(group.get("rewards") or [], config))
    report = filter_report(stats, config)
    counters = stage_totals(location(stage_dir))["counters"]

    def prefixed(prefix: str) -> dict[str, int]:
        return {k[len(prefix):]: v for k, v in sorted(counters.items()) if k.startswith(prefix)}

    report["incomplete_groups"] = incomplete
    report["not_sampled"] = prefixed("skipped:")
    report["responses"] = counters.get("responses", 0)
    report["responses_zeroed"] = prefixed("zeroed:")
    report["responses_zero_reward"] = counters.get("zero_reward", 0)
    report["thresholds"] = config.model_dump(mode="json")
    return report


def summary_line(report: dict[str, Any]) -> str:
    """One line for the end-of-run summary."""
    removed = ", ".join(f"{rule} {n}" for rule, n in report["dropped_by_first_rule"].items() if n) or "none"
    line = f"kept {report['kept']} of {report['items']} groups (removed by first failing rule: {removed})"
    if report["incomplete_groups"]:
        line += f"; {report['incomplete_groups']} groups with a failed request (errors)"
    if report["not_sampled"]:
        line += "; not sampled: " + ", ".join(f"{k} {v}" for k, v in report["not_sampled"].items())
    return line


def write_report(stage_dir: str | Path, output_dir: str | Path, config: GrpoFilterConfig | None = None
                 ) -> dict[str, Any]:
    """Build the report, write the JSON and the PNG under ``<output_dir>/reports/``, and return the summary entry."""
    config = config or GrpoFilterConfig()
    report = build_report(stage_dir, config)
    folder = location(output_dir) / REPORT_DIR
    json_path, png_path = folder / f"{REPORT_NAME}.json", folder / f"{REPORT_NAME}.png"
    write_json_atomic(json_path, report)
    plot_histograms(report, png_path, config)
    return {"summary": summary_line(report), "items": report["items"], "kept": report["kept"],
            "dropped_by_first_rule": {k: v for k, v in report["dropped_by_first_rule"].items() if v},
            "incomplete_groups": report["incomplete_groups"], "not_sampled": report["not_sampled"],
            "report": str(json_path), "plot": str(png_path)}
