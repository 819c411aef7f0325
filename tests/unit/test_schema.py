import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gmner_pipeline.schema import (RECORD_SCHEMA, SCHEMA_VERSION, SchemaMismatch, conform_table, empty_record,
                                   records_to_table, table_to_records)


def full_record():
    box = [1.0, 2.0, 30.0, 40.0]
    return empty_record(
        id="src/train/1", source="src", split="train", sample_key="1", text="Alice visits Paris",
        tokens=["Alice", "visits", "Paris"],
        image={"path": "/x.jpg", "uri": "src:1", "sha256": "ab", "width": 100, "height": 80},
        grounding_labels="present",
        entities=[{"text": "Alice", "start": 0, "end": 1, "type": "PER", "fine_type": None, "boxes": [box]},
                  {"text": "Paris", "start": 2, "end": 3, "type": "LOC", "fine_type": "city", "boxes": []}],
        retrieval={"query": "q", "source": "local_corpus", "candidates": [{"uri": "u", "sha256": "s", "score": 0.5}],
                   "chosen_score": 0.5, "alpha": 0.3, "model_id": "ViT-B-32"},
        detections={"model_id": "rtmdet", "backend": "onnxruntime",
                    "boxes": [{"label": "person", "score": 0.9, "box": box}], "annotation_text": "person: [1,2,30,40]"},
        knowledge=[{"entity": "Alice", "type": "PER", "fine_type": "athlete", "knowledge": "k",
                    "answers": [{"model_id": "m", "text": "t"}], "voted": "v", "cache_key": "c"}],
        cot={"chains": [{"style": "template", "route": "a", "model_id": None, "seed": 1, "think": "t",
                         "answer": "Alice|PER|[1,2,30,40]; Paris|LOC|None", "text": "x", "consistent": True,
                         "rejection": None, "attempts": 1, "style_key": "s", "prompt_tokens": 10,
                         "completion_tokens": 5, "seconds": 0.5, "frame": "qwen2_vl", "heldout": False}],
             "split": "D1", "skipped": None},
        grpo={"policy_id": "p", "responses": ["r"], "rewards": [0.5], "mean": 0.5, "std": 0.0, "max": 0.5,
              "median": 0.5, "keep": False, "reason": "std"},
        lineage=[{"stage": "ingest", "stage_version": "1", "stage_key": "k", "config_hash": "c", "run_id": "r",
                  "model_ids": [], "prompt_hash": None, "prompt_tokens": 0, "completion_tokens": 0, "seconds": 0.1}],
    )


def test_round_trip_through_parquet(tmp_path):
    rec = full_record()
    path = tmp_path / "s.parquet"
    pq.write_table(records_to_table([rec, empty_record(id="b", source="s")]), path)
    back = table_to_records(pq.read_table(path))
    assert back[0]["entities"] == rec["entities"]
    assert back[0]["cot"] == rec["cot"]
    assert back[0]["detections"]["boxes"][0]["box"] == [1.0, 2.0, 30.0, 40.0]
    assert back[1]["status"] == "ok" and back[1]["cot"] is None
    assert pq.read_schema(path).metadata[b"gmner_pipeline.schema_version"] == SCHEMA_VERSION.encode()


def test_unknown_field_is_rejected():
    with pytest.raises(KeyError, match="not in the schema"):
        records_to_table([{**empty_record(id="a", source="s"), "surprise": 1}])
    with pytest.raises(KeyError):
        empty_record(id="a", source="s", surprise=1)


def test_older_minor_version_gains_null_columns():
    old_fields = [f for f in RECORD_SCHEMA if f.name != "grpo"]
    old = pa.schema(old_fields, metadata={b"gmner_pipeline.schema_version": b"1.0"})
    rec = {k: v for k, v in full_record().items() if k != "grpo"}
    table = conform_table(pa.Table.from_pylist([rec], schema=old))
    assert table.schema.equals(RECORD_SCHEMA, check_metadata=False)
    assert table.column("grpo").to_pylist() == [None]


def test_other_major_version_is_refused_with_advice():
    table = records_to_table([empty_record(id="a", source="s")])
    table = table.replace_schema_metadata({b"gmner_pipeline.schema_version": b"0.9"})
    with pytest.raises(SchemaMismatch, match="rerun the stage"):
        conform_table(table)
