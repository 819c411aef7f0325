"""Shards go through the tools users already have and come back as records: Ray Data, pandas, DuckDB, polars (each
writes Parquet with its own schema and without ours), and ``datasets.load_dataset(<stage folder>)``."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from conftest import write_gmner_dataset
from gmner_pipeline.cli import app
from gmner_pipeline.ingest.twitter_gmner import read_twitter_gmner
from gmner_pipeline.schema import SchemaMismatch
from gmner_pipeline.shards import read_records, write_records
from gmner_pipeline.stages import load_stage

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> tuple[Path, list[dict]]:
    """A template_cot shard: nested lists of structs (entities with boxes, chains), null column groups, lineage."""
    tmp = tmp_path_factory.mktemp("interop")
    cls = load_stage("template_cot")
    stage = cls(cls.Config())
    stage.setup()
    records = stage(list(read_twitter_gmner(write_gmner_dataset(tmp / "data", 6), "train")))
    assert any(r["cot"] and r["cot"]["chains"] for r in records)
    path = tmp / "shard-00000.parquet"
    write_records(path, records)
    return path, sorted(read_records(path), key=lambda r: r["id"])  # as stored (float32 boxes and seconds)


def back(path: Path) -> list[dict]:
    assert b"gmner_pipeline.schema_version" not in (pq.read_schema(path).metadata or {})  # the tool dropped ours
    return sorted(read_records(path), key=lambda r: r["id"])


def test_pandas_round_trip(shard, tmp_path):
    pd = pytest.importorskip("pandas")
    path, records = shard
    pd.read_parquet(path).to_parquet(tmp_path / "p.parquet")
    assert back(tmp_path / "p.parquet") == records


def test_polars_round_trip(shard, tmp_path):
    pl = pytest.importorskip("polars")
    path, records = shard
    pl.read_parquet(path).write_parquet(tmp_path / "p.parquet")
    assert back(tmp_path / "p.parquet") == records


def test_duckdb_round_trip(shard, tmp_path):
    duckdb = pytest.importorskip("duckdb")
    path, records = shard
    con = duckdb.connect()
    con.execute(f"COPY (SELECT * FROM read_parquet('{path}') ORDER BY id DESC) TO '{tmp_path / 'd.parquet'}' "
                "(FORMAT parquet)")
    assert back(tmp_path / "d.parquet") == records


def test_ray_data_round_trip(shard, tmp_path, ray_local):
    path, records = shard
    ray_local.data.DataContext.get_current().enable_progress_bars = False
    (ray_local.data.read_parquet(str(path))
     .map_batches(lambda batch: batch, batch_format="pandas")  # through pandas blocks, as user code would
     .write_parquet(str(tmp_path / "ray")))
    (written,) = (tmp_path / "ray").glob("*.parquet")
    assert back(written) == records


def test_a_table_that_does_not_conform_is_refused_with_a_clear_message(shard, tmp_path):
    path, _ = shard
    table = pq.read_table(path).replace_schema_metadata(None)
    renamed = table.rename_columns(["ID" if n == "id" else n for n in table.column_names])
    pq.write_table(renamed, tmp_path / "renamed.parquet")
    with pytest.raises(SchemaMismatch, match=r"columns not in the schema: \['ID'\]; required columns missing: \['id'\]"):
        read_records(tmp_path / "renamed.parquet")
    retyped = table.set_column(table.column_names.index("tokens"), "tokens",
                               pa.array([1] * table.num_rows, type=pa.int64()))
    pq.write_table(retyped, tmp_path / "retyped.parquet")
    with pytest.raises(SchemaMismatch, match="column 'tokens' has type int64"):
        read_records(tmp_path / "retyped.parquet")
    # a subset of the columns (a user kept what they needed) reads as records with the rest empty
    pq.write_table(table.select(["id", "source", "status", "text"]), tmp_path / "subset.parquet")
    subset = read_records(tmp_path / "subset.parquet")
    assert subset[0]["text"] and subset[0]["entities"] is None


def test_datasets_load_dataset_reads_a_stage_folder(tmp_path, ray_local, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    data = write_gmner_dataset(tmp_path / "data", 10)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", "--output", str(out), "--set", "source.kind=twitter_gmner",
                                      "--set", f"source.path={data}", "--set", "run.shard_size=4",
                                      "--set", "run.progress=false", "--set", "pipeline=[passthrough]"])
    assert result.exit_code == 0, result.output
    (stage_dir,) = (out / "passthrough").iterdir()
    assert len(list(stage_dir.glob("*.json"))) > len(list(stage_dir.glob("*.parquet")))  # markers outnumber shards
    for folder in (stage_dir, next((out / "ingest").iterdir())):
        ds = datasets.load_dataset(str(folder), cache_dir=str(tmp_path / "hf-cache"))
        assert ds["train"].num_rows == 10
        assert sorted(ds["train"]["id"]) == [f"twitter-gmner-v2/train/{1000 + i}" for i in range(10)]
