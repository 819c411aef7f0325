import pytest

from gmner_pipeline.schema import empty_record
from gmner_pipeline.shards import is_committed, read_json, read_records, shard_path, write_records, marker_path
from gmner_pipeline.stage import Stage, StageContext, mark_dropped
from gmner_pipeline.stages.passthrough import PassthroughConfig, PassthroughStage
from gmner_pipeline.worker import ShardProcessor, StageContractError


def records(n):
    return [empty_record(id=f"r{i}", source="t", text=f"t{i}") for i in range(n)]


def test_a_raising_record_becomes_an_error_and_nothing_is_lost(tmp_path):
    write_records(tmp_path / "in.parquet", records(10))
    proc = ShardProcessor(PassthroughStage, PassthroughConfig(batch_size=4, fail_ids=["r3", "r7"]),
                          StageContext(run_id="x"))
    stats = proc.process(0, tmp_path / "in.parquet", tmp_path / "out")
    out = read_records(shard_path(tmp_path / "out", 0))
    assert [r["id"] for r in out] == [f"r{i}" for i in range(10)]
    bad = {r["id"]: r for r in out if r["status"] == "error"}
    assert set(bad) == {"r3", "r7"} and "told to fail on r3" in bad["r3"]["error"]
    assert bad["r3"]["error_stage"] == "passthrough"
    assert stats["records_error"] == 2 and stats["new_errors"] == 2 and stats["records_ok"] == 8
    assert is_committed(tmp_path / "out", 0) and read_json(marker_path(tmp_path / "out", 0))["records_in"] == 10


class LosesRecords(Stage):
    name = "loses"

    def process(self, recs):
        return recs[:-1]


def test_a_stage_that_loses_records_fails_the_shard_loudly(tmp_path):
    write_records(tmp_path / "in.parquet", records(3))
    proc = ShardProcessor(LosesRecords, LosesRecords.Config(), StageContext())
    with pytest.raises(StageContractError, match="exactly once"):
        proc.process(0, tmp_path / "in.parquet", tmp_path / "out")
    assert not is_committed(tmp_path / "out", 0)


class Drops(Stage):
    name = "drops"

    def process(self, recs):
        return [mark_dropped(r, self.name, "too_long") if r["id"] == "r1" else r for r in recs]


def test_drop_reasons_are_counted(tmp_path):
    write_records(tmp_path / "in.parquet", records(3))
    stats = ShardProcessor(Drops, Drops.Config(), StageContext()).process(0, tmp_path / "in.parquet", tmp_path / "o")
    assert stats["drop_reasons"] == {"too_long": 1} and stats["records_dropped"] == 1
