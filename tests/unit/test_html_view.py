import json

from gmner_pipeline.html_view import render_html
from gmner_pipeline.schema import empty_record
from gmner_pipeline.shards import commit_shard, shard_path, write_records
from PIL import Image


def test_a_malformed_detector_box_does_not_break_the_page(tmp_path):
    # Detector output is model output: an inverted box must not stop `gmner-pipeline view` (Pillow raises on it).
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    rec = empty_record(id="s/train/1", source="s", text="Alice", image={"path": str(tmp_path / "a.png"), "width": 40,
                                                                         "height": 30},
                       detections={"model_id": "m", "backend": "onnxruntime", "annotation_text": "",
                                   "boxes": [{"label": "person", "score": 0.9, "box": [30.0, 5.0, 10.0, 20.0]},
                                             {"label": "dog", "score": 0.8, "box": [1.0, 2.0, 20.0, 25.0]}]})
    stage_dir = tmp_path / "out" / "annotate" / "k"
    write_records(shard_path(stage_dir, 0), [rec])
    commit_shard(stage_dir, 0, {"records_in": 1, "records_ok": 1})
    (tmp_path / "out" / "latest.json").write_text(json.dumps(
        {"run_id": "r", "chain": [{"stage": "annotate", "key": "k", "dir": str(stage_dir)}]}))
    page = render_html(tmp_path / "out")
    assert "s/train/1" in page and "data:image/jpeg;base64," in page


def test_an_unknown_stage_is_refused_not_replaced_by_the_last(tmp_path):
    import pytest

    stage_dir = tmp_path / "out" / "annotate" / "k"
    write_records(shard_path(stage_dir, 0), [empty_record(id="s/train/1", source="s")])
    (tmp_path / "out" / "latest.json").write_text(json.dumps(
        {"run_id": "r", "chain": [{"stage": "annotate", "key": "k", "dir": str(stage_dir)}]}))
    with pytest.raises(KeyError, match="annotat"):
        render_html(tmp_path / "out", stage="annotat")
