"""The run's dataset folder: D1 / D2 (and D2_filtered) as per-split Parquet, training records only."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import yaml

from gmner_pipeline import runner
from gmner_pipeline.config import load_config
from gmner_pipeline.publish import DATASET_DIR, split_of_records
from gmner_pipeline.schema import empty_record
from gmner_pipeline.splits import DatasetConfig

from conftest import write_gmner_dataset

pytestmark = pytest.mark.integration


def _config(tmp_path, **dataset):
    data = tmp_path / "data"
    write_gmner_dataset(data, 40, "train")
    write_gmner_dataset(data, 12, "test")  # same layout: test tweets reuse ids 1000.. in their own split
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "run": {"output_dir": str(tmp_path / "out"), "shard_size": 8, "progress": False},
        "source": {"kind": "twitter_gmner", "path": str(data), "splits": ["train", "test"]},
        "pipeline": ["template_cot"], "dataset": dataset}))
    return path


def test_a_run_publishes_d1_and_d2_of_train_records_only(tmp_path, ray_local):
    result = runner.run(load_config(str(_config(tmp_path, d1_fraction=0.5))))
    assert result.ok
    root = tmp_path / "out" / DATASET_DIR
    tables = {name: pq.read_table(sorted((root / name).glob("*.parquet"))) for name in ("D1", "D2")}
    ids = {name: t.column("id").to_pylist() for name, t in tables.items()}
    assert len(ids["D1"]) + len(ids["D2"]) == 40 and not set(ids["D1"]) & set(ids["D2"])
    assert all("/train/" in i for name in ids for i in ids[name])
    assert 8 <= len(ids["D1"]) <= 32  # a 0.5 hash split of 40 records
    assert not (root / "D2_filtered").exists()  # no stage wrote grpo

    import datasets

    ds = datasets.load_dataset("parquet", data_files={"D1": str(root / "D1" / "*.parquet")})
    assert ds["D1"].num_rows == len(ids["D1"])

    again = runner.run(load_config(str(_config(tmp_path, d1_fraction=1.0))))  # a new split: the folder is rebuilt
    assert again.ok
    assert not (root / "D2").exists() and pq.read_table(root / "D1").num_rows == 40


def test_publishing_refuses_a_test_record_marked_for_training():
    rec = empty_record(id="x/test/1", source="x", split="test",
                       cot={"chains": [{"consistent": True}], "split": "D1", "skipped": None})
    with pytest.raises(ValueError, match="only \\['train'\\] records may enter training data"):
        split_of_records([rec], DatasetConfig(), with_filtered=False)
