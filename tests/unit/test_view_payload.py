"""The view's files without a browser: every record in the index, details in chunks, inverted model boxes kept out
of nothing (the page skips them), an unknown stage refused."""

import json

import pytest
from PIL import Image

from gmner_pipeline.report import StageNotInRun
from gmner_pipeline.schema import empty_record
from gmner_pipeline.shards import commit_shard, shard_path, write_records
from gmner_pipeline.view import write_view


def _output(tmp_path, n=5):
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    recs = [empty_record(id=f"s/train/{i}", source="s", text="Alice </script><b>x</b>",
                         image={"path": str(tmp_path / "a.png"), "width": 40, "height": 30},
                         detections={"model_id": "m", "backend": "onnxruntime", "annotation_text": "",
                                     "boxes": [{"label": "person", "score": 0.9, "box": [30.0, 5.0, 10.0, 20.0]}]})
            for i in range(n)]
    stage_dir = tmp_path / "out" / "annotate" / "k"
    write_records(shard_path(stage_dir, 0), recs)
    commit_shard(stage_dir, 0, {"records_in": n, "records_ok": n})
    (tmp_path / "out" / "latest.json").write_text(json.dumps(
        {"run_id": "r", "chain": [{"stage": "annotate", "key": "k", "dir": str(stage_dir)}]}))
    return tmp_path / "out"


def test_index_chunks_thumbnails_and_escaping(tmp_path):
    out = _output(tmp_path)
    result = write_view(out, chunk_size=2)
    assert (result.records, result.images) == (5, 5)
    files = result.page.parent / "index_files"
    assert sorted(p.name for p in files.glob("records-*.js")) == ["records-00000.js", "records-00001.js",
                                                                  "records-00002.js"]
    assert len(list((files / "img").glob("*.jpg"))) == 1  # one image file: one thumbnail
    page = result.page.read_text()
    assert "</script><b>" not in page  # the tweet cannot close the page's script element
    chunk = (files / "records-00002.js").read_text()
    assert chunk.startswith("gmnerChunk(2,") and '"id":"s/train/4"' in chunk
    assert '"box":[30.0,5.0,10.0,20.0]' in chunk  # kept as the model wrote it; the page does not draw it
    again = write_view(out, chunk_size=10)  # fewer chunks: the old ones are removed
    assert sorted(p.name for p in files.glob("records-*.js")) == ["records-00000.js"] and again.records == 5


def test_an_unknown_stage_is_refused_not_replaced_by_the_last(tmp_path):
    out = _output(tmp_path)
    with pytest.raises(StageNotInRun, match="annotat"):
        write_view(out, stage="annotat")


def test_fields_of_the_stages_being_built_are_shown_when_present():
    from gmner_pipeline.view.payload import detail, index_entry

    rec = {"id": "s/train/1", "status": "ok", "entities": [], "tokens": ["a"],
           "knowledge": [{"entity": "Paris", "type": "LOC", "fine_type": "city", "knowledge": "a skyline",
                          "status": "ok", "fine_type_support": ["gen_a"],
                          "aspects": [{"aspect": "landmark", "text": "Eiffel tower", "support": ["gen_a", "gen_b"]}],
                          "answers": [{"model_id": "m", "role": "gen_b", "ok": False, "error": "timeout"}]}],
           "cot": {"split": "D2", "chains": [{"style": "mllm", "model_id": "qwen-vl-72b", "consistent": False,
                                              "rejection": "wrong_answer", "heldout": False}]},
           "grpo": {"policy_id": "p", "rewards": [0.25, None], "responses": ["x", None], "mean": 0.25, "std": 0.0,
                    "max": 0.25, "median": 0.25, "keep": False, "reason": "low_std"}}
    d = detail(rec, None)
    k = d["knowledge"][0]
    assert k["aspects"][0]["support"] == ["gen_a", "gen_b"] and k["fine_type_support"] == ["gen_a"]
    assert k["answers"][0] == {"role": "gen_b", "model": "m", "ok": False, "text": "", "error": "timeout"}
    assert d["chains"][0]["teacher"] == "qwen-vl-72b" and d["chains"][0]["rejection"] == "wrong_answer"
    assert d["grpo"]["rewards"] == [0.25, None] and d["grpo"]["reason"] == "low_std"
    entry = index_entry(0, rec, False)
    assert (entry["teachers"], entry["grpo"], entry["grpo_reason"], entry["dsplit"]) == (
        ["qwen-vl-72b"], "dropped", "low_std", "D2")
    bare = detail({"id": "s/train/2", "status": "ok"}, None)  # a record of schema 1.0 with nothing but the sample
    assert bare["knowledge"] == [] and bare["chains"] == [] and bare["grpo"] is None
