"""One reader of a stage's committed output: status, show, view and eval never read a file without its marker."""

from __future__ import annotations

import json

import pytest

from gmner_pipeline.report import find_record, status_table
from gmner_pipeline.runner import stage_totals
from gmner_pipeline.schema import empty_record
from gmner_pipeline.scoring.io import load_predictions, parquet_files
from gmner_pipeline.shards import (
    MANIFEST, commit_shard, committed_dataset, committed_shards, committed_table, iter_committed_records,
    marker_path, read_markers, shard_path, void_shard, write_json_atomic, write_records,
)


def rec(i: int, text: str = "ok") -> dict:
    return empty_record(id=f"s/train/{i}", source="s", split="train", text=text, tokens=[text])


@pytest.fixture
def stage_dir(tmp_path):
    """shard 0 committed; shard 1 written but not committed (being written, or voided); shard 2 a marker whose file
    is gone."""
    out = tmp_path / "out"
    d = out / "template_cot" / "k"
    write_json_atomic(d / MANIFEST, {"stage": "template_cot"})
    write_records(shard_path(d, 0), [rec(0), rec(1)])
    commit_shard(d, 0, {"records_in": 2, "records_ok": 2})
    write_records(shard_path(d, 1), [rec(2, "stale"), rec(3, "stale")])
    write_json_atomic(marker_path(d, 2), {"records_in": 5, "records_ok": 5})
    write_json_atomic(out / "latest.json", {"run_id": "r", "ingest": {"num_shards": 3}, "final_dir": str(d),
                                            "chain": [{"stage": "template_cot", "key": "k", "dir": str(d)}]})
    return d


def test_the_reader_yields_committed_records_only(stage_dir):
    assert committed_shards(stage_dir) == [shard_path(stage_dir, 0)]
    assert [r["id"] for r in iter_committed_records(stage_dir)] == ["s/train/0", "s/train/1"]
    assert [r["text"] for r in iter_committed_records(stage_dir, columns=["id", "text"])] == ["ok", "ok"]
    assert committed_table(stage_dir).num_rows == 2
    assert committed_table(stage_dir, ["id", "cot"]).column_names == ["id", "cot"]
    assert committed_table(stage_dir.parent / "nothing-here").num_rows == 0
    data = committed_dataset(stage_dir, columns=["id", "status"])
    assert len(data) == 2 and data[0] == {"id": "s/train/0", "status": "ok"}
    assert list(read_markers(stage_dir)) == [0]  # a marker without its file is not a committed shard
    assert stage_totals(stage_dir)["records_in"] == 2


def test_status_show_view_and_eval_ignore_uncommitted_files(stage_dir, tmp_path):
    out = tmp_path / "out"
    assert find_record(out, "s/train/0")["_stage"] == "template_cot"
    with pytest.raises(KeyError, match="no record"):
        find_record(out, "s/train/2")
    from gmner_pipeline.view import write_view

    view = write_view(out, tmp_path / "v.html")
    index = view.page.read_text()
    assert view.records == 2 and '"s/train/0"' in index and "s/train/2" not in index
    rows = list(status_table(out).columns[3].cells)  # "records in"
    assert rows == ["2"]
    for given in (out, stage_dir, out / "template_cot"):
        assert parquet_files([given]) == [shard_path(stage_dir, 0)], given
        assert sorted(load_predictions([given]).by_id) == ["s/train/0", "s/train/1"]


def test_voiding_a_shard_removes_its_file_with_its_marker(stage_dir):
    void_shard(stage_dir, 0)
    assert not marker_path(stage_dir, 0).exists() and not shard_path(stage_dir, 0).exists()
    assert list(iter_committed_records(stage_dir)) == []
    void_shard(stage_dir, 7)  # nothing there: fine


def test_plain_parquet_folders_are_read_whole(tmp_path):
    # predictions exported elsewhere (no stage manifest, no markers) are not pipeline shards: every file counts
    write_records(tmp_path / "preds" / "a.parquet", [rec(0)])
    write_records(tmp_path / "preds" / "b.parquet", [rec(1)])
    assert [p.name for p in parquet_files([tmp_path / "preds"])] == ["a.parquet", "b.parquet"]
    assert json.loads(json.dumps(sorted(load_predictions([tmp_path / "preds"]).by_id))) == ["s/train/0", "s/train/1"]
