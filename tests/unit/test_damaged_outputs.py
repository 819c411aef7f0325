"""Damaged outputs heal: a truncated shard, a marker that is empty, garbage or disagrees with its file is not a
committed shard anywhere (the runner, status, show, view, the readers), the next run redoes it, ingest included, and
stray temporary files go on every run. Runs here use the in-process executor (no Ray); the Ray path shares the code."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from conftest import write_gmner_dataset
from gmner_pipeline import runner
from gmner_pipeline.config import load_config
from gmner_pipeline.ingest_step import ingest_complete
from gmner_pipeline.latest import load_latest
from gmner_pipeline.report import find_record, status_table
from gmner_pipeline.schema import empty_record
from gmner_pipeline.shards import (
    check_shard, commit_shard, committed_indices, iter_committed_records, marker_path, read_json, read_markers,
    read_records, shard_path, shard_problem, write_json_atomic, write_records,
)
from gmner_pipeline.summary import stage_totals
from gmner_pipeline.view import write_view

PLUGIN = "gmner_pipeline.stages.passthrough:PassthroughStage"


def rec(i: int) -> dict:
    return empty_record(id=f"s/train/{i}", source="s", split="train", text=f"t{i}", tokens=[f"t{i}"])


@pytest.fixture
def shard(tmp_path):
    d = tmp_path / "stage"
    write_records(shard_path(d, 0), [rec(i) for i in range(50)])
    commit_shard(d, 0, {"records_in": 50})
    return d


def truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_an_intact_shard_is_committed_and_its_marker_records_the_file(shard):
    marker, problem = check_shard(shard, 0)
    assert problem is None and marker["file"] == {"bytes": shard_path(shard, 0).stat().st_size, "rows": 50}
    assert marker["commit_id"] and marker["input_commit"] is None and marker["replaces"] == []


@pytest.mark.parametrize("damage, reason", [
    (lambda d: truncate(shard_path(d, 0)), "bytes"),
    (lambda d: marker_path(d, 0).write_text(""), "unreadable"),
    (lambda d: marker_path(d, 0).write_text("\x00garbage{"), "unreadable"),
    (lambda d: marker_path(d, 0).write_text("[1, 2]"), "no record"),
    (lambda d: write_json_atomic(marker_path(d, 0), {**read_json(marker_path(d, 0)),
                                                     "file": {"bytes": shard_path(d, 0).stat().st_size,
                                                              "rows": 49}}), "49"),
    (lambda d: write_records(shard_path(d, 0), [rec(i) for i in range(50, 99)]), "bytes"),  # replaced
])
def test_a_damaged_shard_is_not_committed_for_any_reader(shard, damage, reason):
    damage(shard)
    assert reason in shard_problem(shard, 0)
    assert committed_indices(shard) == set() and read_markers(shard) == {}
    assert list(iter_committed_records(shard)) == [] and stage_totals(shard)["records_in"] == 0


def test_a_marker_from_before_the_file_facts_is_checked_by_its_record_count(shard):
    legacy = {"records_in": 50, "records_ok": 50}
    write_json_atomic(marker_path(shard, 0), legacy)
    assert shard_problem(shard, 0) is None
    write_json_atomic(marker_path(shard, 0), {**legacy, "records_in": 51})
    assert "51" in shard_problem(shard, 0)


# --- through the runner -----------------------------------------------------------------------------------------------

def config(tmp_path: Path, n: int = 20, shard_size: int = 5, *sets: str):
    data = write_gmner_dataset(tmp_path / "data", n)
    return load_config(None, [f"run.output_dir={tmp_path / 'out'}", f"run.shard_size={shard_size}", "run.progress=false",
                              "run.executor=local", f"source={{kind: twitter_gmner, path: {data}}}",
                              f"pipeline=[passthrough, '{PLUGIN}']", *sets])


def ids(stage_dir: Path) -> Counter:
    return Counter(r["id"] for r in iter_committed_records(stage_dir, columns=["id"]))


EXPECTED = Counter(f"twitter-gmner-v2/train/{1000 + i}" for i in range(20))


def test_a_truncated_shard_and_a_garbage_marker_are_redone_on_rerun(tmp_path):
    cfg = config(tmp_path)
    first = runner.run(cfg)
    up, down = first.plan.stages
    truncate(shard_path(down.dir, 1))
    marker_path(up.dir, 2).write_text("garbage")
    out = tmp_path / "out"
    # before the rerun every reader agrees: those shards are not there
    assert committed_indices(down.dir) == {0, 2, 3} and sum(ids(down.dir).values()) == 15
    assert [c for c in status_table(out).columns[2].cells] == ["4/4", "3/4", "3/4"]
    with pytest.raises(KeyError, match="no record"):
        find_record(out, "twitter-gmner-v2/train/1005", stage=down.name)  # used to crash on the truncated file
    view = write_view(out, tmp_path / "view" / "index.html", stage=down.name)
    assert view.records == 15 and "twitter-gmner-v2/train/1005" not in view.page.read_text()

    again = runner.run(cfg)
    assert again.ok
    assert [again.stages[s.name].processed_now for s in again.plan.stages] == [1, 2]  # up 2; down 1 and 2
    assert [sh for sh, _ in again.stages[up.name].healed] == [2]
    assert [sh for sh, _ in again.stages[down.name].healed] == [1]
    assert ids(down.dir) == EXPECTED


def test_a_damaged_ingest_shard_is_rewritten_and_what_was_made_from_it_redone(tmp_path):
    cfg = config(tmp_path)
    first = runner.run(cfg)
    ingest_dir, (up, down) = first.plan.ingest.dir, first.plan.stages
    before = read_markers(down.dir)
    truncate(shard_path(ingest_dir, 3))
    assert ingest_complete(first.plan.ingest) is None  # the completion file alone is not trusted

    again = runner.run(cfg)
    assert again.ok and again.ingest["shards_written"] == 1
    assert [again.stages[s.name].processed_now for s in again.plan.stages] == [1, 1]
    after = read_markers(down.dir)
    assert [i for i in after if after[i]["commit_id"] != before[i]["commit_id"]] == [3]
    assert ids(down.dir) == EXPECTED
    assert runner.run(cfg).stages[down.name].processed_now == 0  # healed for good


def test_an_ingest_killed_half_way_keeps_its_intact_shards(tmp_path):
    cfg = config(tmp_path)
    first = runner.run(cfg, stages=[])
    ingest_dir = first.plan.ingest.dir
    kept = read_markers(ingest_dir)[0]["commit_id"]
    (ingest_dir / "_complete.json").unlink()
    (shard_path(ingest_dir, 2)).unlink()
    again = runner.run(cfg, stages=[])
    assert again.ingest["shards_written"] == 1 and read_markers(ingest_dir)[0]["commit_id"] == kept


def test_stray_temporaries_go_on_every_run_even_one_with_nothing_to_do(tmp_path):
    cfg = config(tmp_path)
    first = runner.run(cfg)
    out = tmp_path / "out"
    strays = [out / ".dataset.tmp-x" / "D1" / "part-00000.parquet", out / "latest.json.tmp-abc.tmp",
              out / "cache" / "source-digests.json.tmp-1.tmp", first.plan.ingest.dir / "shard-00000.parquet.tmp-2.tmp",
              *(s.dir / "shard-00001.parquet.tmp-3.tmp" for s in first.plan.stages),
              first.plan.stages[0].dir / "shard-00002.tmp-beat.tmp"]
    for path in strays:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    again = runner.run(cfg)
    assert [again.stages[s.name].processed_now for s in again.plan.stages] == [0, 0]
    assert [p for p in strays if p.exists()] == [] and not (out / ".dataset.tmp-x").exists()


def test_a_moved_output_folder_keeps_working_and_a_missing_stage_folder_is_an_error(tmp_path):
    from typer.testing import CliRunner

    from gmner_pipeline.cli import app

    cfg = config(tmp_path)
    first = runner.run(cfg)
    latest_text = (tmp_path / "out" / "latest.json").read_text()
    assert str(tmp_path) not in latest_text  # folders inside the output folder are relative to it
    moved = tmp_path / "moved"
    os.rename(tmp_path / "out", moved)
    cli = CliRunner()
    status = cli.invoke(app, ["status", str(moved)])
    assert status.exit_code == 0 and "4/4" in status.output, status.output
    assert cli.invoke(app, ["show", str(moved), "twitter-gmner-v2/train/1003"]).exit_code == 0
    view = cli.invoke(app, ["view", str(moved)])
    assert view.exit_code == 0 and "twitter-gmner-v2/train/1003" in (moved / "view" / "index.html").read_text()
    assert cli.invoke(app, ["card", str(moved)]).exit_code == 0

    # a summary written by an older version holds absolute folders: still read after the move
    old = load_latest(moved)
    old["chain"] = [{**e, "dir": str(tmp_path / "out" / Path(e["dir"]).relative_to(moved))} for e in old["chain"]]
    write_json_atomic(moved / "latest.json", old)
    assert cli.invoke(app, ["status", str(moved)]).exit_code == 0

    down = moved / first.plan.stages[-1].name
    os.rename(down, tmp_path / "elsewhere")
    for args in (["status", str(moved)], ["show", str(moved), "twitter-gmner-v2/train/1003"], ["view", str(moved)],
                 ["ids", str(moved)], ["card", str(moved)]):
        result = cli.invoke(app, args)
        assert result.exit_code == 2 and "missing" in result.output, (args, result.output)
    # and the runner itself finds nothing committed there, so a rerun recomputes it
    again = runner.run(load_config(None, [f"run.output_dir={moved}", *cfg_sets(cfg)]))
    assert again.ok and again.stages[first.plan.stages[-1].name].processed_now == 4


def cfg_sets(cfg) -> list[str]:
    data = cfg.source.path
    return ["run.shard_size=5", "run.progress=false", "run.executor=local",
            f"source={{kind: twitter_gmner, path: {data}}}", f"pipeline=[passthrough, '{PLUGIN}']"]


def test_read_records_of_a_repaired_ingest_match(tmp_path):
    """Rewriting an ingest shard from the source gives the same records (what makes keeping intact shards safe)."""
    cfg = config(tmp_path)
    first = runner.run(cfg, stages=[])
    before = read_records(shard_path(first.plan.ingest.dir, 1))
    truncate(shard_path(first.plan.ingest.dir, 1))
    runner.run(cfg, stages=[])
    assert read_records(shard_path(first.plan.ingest.dir, 1)) == before
