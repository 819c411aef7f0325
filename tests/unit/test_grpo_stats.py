"""GRPO reward-statistics filter: statistics, each rule, the first failing rule, the report and its plot."""

from __future__ import annotations

import json

import pytest

from gmner_pipeline.scoring import GrpoFilterConfig, filter_report, group_stats
from gmner_pipeline.scoring.grpo_stats import grpo_column, plot_histograms


def test_statistics_population_std_and_median():
    s = group_stats([0.0, 0.2, 0.4, 1.0])
    assert s.mean == pytest.approx(0.4) and s.max == 1.0 and s.median == pytest.approx(0.3)
    assert s.std == pytest.approx((((0.4) ** 2 + 0.2 ** 2 + 0 + 0.6 ** 2) / 4) ** 0.5)  # ddof 0
    assert (s.keep, s.reason, s.n) == (True, None, 4)
    sample = group_stats([0.0, 0.2, 0.4, 1.0], GrpoFilterConfig(std="sample"))
    assert sample.std == pytest.approx((0.56 / 3) ** 0.5)


@pytest.mark.parametrize("rewards,reason,failed", [
    ([0.6] * 6 + [0.8] * 2, "low_std", ("low_std",)),                     # std 0.0866, max 0.8, median 0.6
    ([0.5] * 8, "low_std", ("low_std", "low_max")),                        # all equal
    ([0.0, 0.0, 0.0, 0.0, 0.7, 0.7], "low_max", ("low_max", "median_below")),  # max < 0.8, median 0
    ([0.0, 0.0, 0.0, 0.9], "median_below", ("median_below",)),             # median 0 < 0.08
    ([0.7, 0.7, 0.9, 0.1], "median_above", ("median_above",)),             # median 0.7 > 0.6
    ([0.0, 0.0, 0.0, 0.0], "low_std", ("low_std", "low_max", "median_below")),
    ([0.9], "too_few_rewards", ("too_few_rewards",)),
    ([None, float("nan"), 0.3], "too_few_rewards", ("too_few_rewards",)),
])
def test_each_rule_and_the_first_failing_one(rewards, reason, failed):
    s = group_stats(rewards)
    assert (s.keep, s.reason, s.failed) == (False, reason, failed)


def test_bounds_are_inclusive_and_configurable():
    edge = group_stats([0.08, 0.08, 0.08, 0.8, 0.8])  # median 0.08 exactly, max 0.8 exactly
    assert edge.keep, edge
    edge = group_stats([0.0, 0.6, 0.6, 0.8])  # median 0.6 exactly
    assert edge.keep, edge
    # rewards are weighted sums (0.2 * 3 = 0.6000000000000001) and shards hold float32 (0.6000000238): still on the bound
    import numpy as np

    three_of_five = 0.2 * 1 + 0.2 * 1 + 0.2 * 1
    assert three_of_five > 0.6 and group_stats([0.0, three_of_five, three_of_five, 0.8]).keep
    assert group_stats([0.0, float(np.float32(0.6)), float(np.float32(0.6)), float(np.float32(0.8))]).keep
    assert group_stats([0.0, 0.6001, 0.6001, 0.8]).reason == "median_above"  # the tolerance is 1e-6, not more
    lenient = GrpoFilterConfig(min_std=0.0, min_max=0.0, median_low=0.0, median_high=1.0)
    assert group_stats([0.5] * 8, lenient).keep
    with pytest.raises(ValueError):
        GrpoFilterConfig(median_low=0.7, median_high=0.6)


def test_grpo_column_matches_the_schema_struct():
    from gmner_pipeline.schema import GRPO

    col = grpo_column(["a", "b"], [0.0, 1.0], "policy@1")
    assert set(col) == {f.name for f in GRPO}
    assert (col["keep"], col["reason"], col["std"]) == (True, None, 0.5)


def test_report_counts_and_histograms(tmp_path):
    stats = [group_stats(r) for r in ([0.5] * 8, [0.0, 0.0, 0.0, 0.9], [0.0, 0.2, 0.4, 1.0], [0.7, 0.7, 0.9, 0.1])]
    rep = filter_report(stats)
    assert (rep["items"], rep["kept"], rep["dropped"]) == (4, 1, 3)
    assert rep["dropped_by_first_rule"] == {"too_few_rewards": 0, "low_std": 1, "low_max": 0, "median_below": 1,
                                            "median_above": 1}
    assert rep["failing_each_rule"]["low_max"] == 1  # [0.5]*8 also fails low_max, after low_std
    assert sum(rep["histograms"]["max"]["counts"]) == 4 and len(rep["histogram_edges"]) == 21
    assert json.loads(json.dumps(rep)) == rep
    png = plot_histograms(rep, tmp_path / "grpo.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_grpo_report_command_on_shards(tmp_path):
    import pyarrow.parquet as pq
    import typer
    from typer.testing import CliRunner

    from gmner_pipeline.schema import empty_record, records_to_table
    from gmner_pipeline.scoring.cli import grpo_report_command

    groups = ([0.0, 0.2, 0.4, 1.0], [0.5] * 8, [0.0, 0.0, 0.0, 0.9])
    recs = [empty_record(id=f"r{i}", source="s", grpo=grpo_column(["x"] * len(g), g, "p")) for i, g in enumerate(groups)]
    recs.append(empty_record(id="no-grpo", source="s"))
    pq.write_table(records_to_table(recs), tmp_path / "part.parquet")
    app = typer.Typer()
    app.command("grpo-report")(grpo_report_command)
    app.command("noop")(lambda: None)
    res = CliRunner().invoke(app, ["grpo-report", str(tmp_path / "part.parquet"), "-o", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "rep" / "grpo_report.json").read_text())
    assert (rep["items"], rep["kept"], rep["dropped_by_first_rule"]["low_std"]) == (3, 1, 1)
    assert (tmp_path / "rep" / "grpo.png").stat().st_size > 1000
    lenient = CliRunner().invoke(app, ["grpo-report", str(tmp_path / "part.parquet"), "-o", str(tmp_path / "r2"),
                                       "--median-low", "0"])
    assert lenient.exit_code == 0 and json.loads((tmp_path / "r2" / "grpo_report.json").read_text())["kept"] == 2
