"""Pure logic of the annotate stage, and the Stage class's record handling with a stand-in backend (faults only;
the real backends are exercised in tests/integration/test_annotate_*.py)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from gmner_pipeline.schema import STATUS_DROPPED, STATUS_ERROR, STATUS_OK, empty_record, records_to_table
from gmner_pipeline.stage import StageSetupError
from gmner_pipeline.stages import load_stage
from gmner_pipeline.stages.annotate import AnnotateConfig, AnnotateStage
from gmner_pipeline.stages.annotate.backends import BACKENDS, DetectorBackend, backend_class
from gmner_pipeline.stages.annotate.boxes import (COCO_CLASSES, MalformedDetection, RawDetection, annotation_text,
                                                  batched_nms, nms, normalise_box, select_top_k, to_schema_boxes)
from gmner_pipeline.stages.annotate.onnx_backend import (detect_output_format, parse_class_metadata,
                                                        split_raw_head_outputs)
from gmner_pipeline.stages.annotate.preprocess import boxes_to_original, letterbox, to_model_input
from gmner_pipeline.stages.annotate.raw_head import decode_rtmdet


def det(label, score, box=(0, 0, 10, 10)):
    return RawDetection(label, score, tuple(float(v) for v in box))


# --- boxes ------------------------------------------------------------------------------------------------------------

def test_top_k_keeps_best_above_threshold_in_score_order():
    dets = [det(0, 0.2), det(1, 0.9), det(2, 0.5), det(3, 0.31), det(4, 0.7), det(5, 0.6), det(6, 0.4)]
    top = select_top_k(dets, k=5, score_threshold=0.3)
    assert [d.label for d in top] == [1, 4, 5, 2, 6]
    assert select_top_k(dets, k=2, score_threshold=0.95) == []


def test_schema_boxes_name_clip_and_reject_unknown_classes():
    boxes = to_schema_boxes([det(0, 0.8, (-5, 3, 120, 50))], COCO_CLASSES, width=100, height=40)
    assert boxes == [{"label": "person", "score": pytest.approx(0.8), "box": [0.0, 3.0, 100.0, 40.0]}]
    with pytest.raises(MalformedDetection, match="class index 80"):
        to_schema_boxes([det(80, 0.9)], COCO_CLASSES, 100, 100)
    with pytest.raises(MalformedDetection, match="non-finite"):
        to_schema_boxes([det(0, 0.9, (0, float("nan"), 1, 1))], COCO_CLASSES, 100, 100)


def test_annotation_text_pixels_normalised_and_empty():
    boxes = [{"label": "person", "score": 0.9, "box": [13.4, 15.6, 365.0, 511.0]},
             {"label": "cup", "score": 0.5, "box": [0.0, 0.0, 50.0, 25.0]}]
    assert annotation_text(boxes) == "person: [13,16,365,511]; cup: [0,0,50,25]"
    assert annotation_text(boxes[1:], normalise_to=(100, 50)) == "cup: [0.000,0.000,0.500,0.500]"
    assert annotation_text([]) == ""
    assert normalise_box((10, 20, 30, 40), 100, 200) == (0.1, 0.1, 0.3, 0.2)


def test_nms_matches_torchvision_on_random_boxes():
    torchvision = pytest.importorskip("torchvision")
    import torch

    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 200, (500, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 80, (500, 2))], axis=1).astype(np.float32)
    scores = rng.uniform(0, 1, 500).astype(np.float32)
    labels = rng.integers(0, 3, 500)
    ours = nms(boxes, scores, 0.5)
    theirs = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.5).numpy()
    assert ours.tolist() == theirs.tolist()
    ours_b = batched_nms(boxes, scores, labels, 0.5, max_keep=40)
    theirs_b = torchvision.ops.batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores),
                                           torch.from_numpy(labels), 0.5).numpy()
    assert ours_b.tolist() == theirs_b[:40].tolist()


# --- preprocessing ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("center", [False, True])
def test_letterbox_and_back_maps_boxes_to_original_pixels(center):
    image = np.zeros((300, 500, 3), np.uint8)
    image[100:200, 50:150] = 255
    canvas, lb = letterbox(image, (320, 320), center=center)
    assert canvas.shape == (320, 320, 3)
    ys, xs = np.nonzero(canvas[..., 0] == 255)
    model_box = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], float)
    np.testing.assert_allclose(boxes_to_original(model_box, lb), [[50, 100, 150, 200]], atol=1.0)
    assert (canvas[-1, -1] == 114).all()  # padded


def test_model_input_channel_order_and_normalisation():
    bgr = np.zeros((2, 2, 3), np.uint8)
    bgr[..., 0] = 10  # blue
    out = to_model_input([bgr], "rgb", mean=(0, 0, 10), std=(1, 1, 2))
    assert out.shape == (1, 3, 2, 2) and out.dtype == np.float32
    assert out[0, 2, 0, 0] == 0.0 and out[0, 0, 0, 0] == 0.0  # blue is the last channel in RGB, minus its mean


def test_decode_rtmdet_one_prior():
    cls8 = np.full((2, 2, 2), -20.0, np.float32)
    cls8[1, 1, 0] = 5.0  # class 1 at prior (x=0, y=1) of stride 8 -> point (0, 8)
    box8 = np.zeros((4, 2, 2), np.float32)
    box8[:, 1, 0] = [0, 4, 10, 6]  # left, top, right, bottom
    boxes, scores, labels = decode_rtmdet([cls8], [box8], [8], (16, 16), 0.001, 1000, 0.65, 300)
    np.testing.assert_allclose(boxes, [[0, 4, 10, 14]])
    assert labels.tolist() == [1] and scores[0] == pytest.approx(1 / (1 + np.exp(-5.0)))


def test_onnx_metadata_and_output_layout():
    assert parse_class_metadata({"names": "{0: 'person', 1: 'bike'}"}) == ["person", "bike"]
    assert parse_class_metadata({"classes": '["a", "b"]'}) == ["a", "b"]
    assert parse_class_metadata({"labels": "a, b ,c"}) == ["a", "b", "c"]
    assert parse_class_metadata({}) is None
    assert detect_output_format([["b", "n", 5], ["b", "n"]]) == "end2end"
    assert detect_output_format([[1, 80, 40, 40]] * 3 + [[1, 4, 40, 40]] * 3) == "raw_head"
    assert split_raw_head_outputs(["bbox_8", "cls_8", "bbox_16", "cls_16"]) == ([1, 3], [0, 2])
    assert split_raw_head_outputs(["o1", "o2", "o3", "o4"]) == ([0, 1], [2, 3])
    with pytest.raises(StageSetupError, match="output_format"):
        detect_output_format([[1, 3549, 85]])


# --- config and registry ----------------------------------------------------------------------------------------------

def test_config_defaults_and_validation():
    cfg = AnnotateConfig()
    assert cfg.top_k == 5 and cfg.detector.backend == "mmdet"
    onnx = AnnotateConfig.model_validate({"detector": {"backend": "onnxruntime", "path": "m.onnx"}})
    assert onnx.detector.mean == (103.53, 116.28, 123.675)
    with pytest.raises(ValidationError):
        AnnotateConfig.model_validate({"detector": {"backend": "onnxruntime", "paht": "m.onnx"}})
    with pytest.raises(ValidationError):
        AnnotateConfig.model_validate({"detector": {"backend": "tensorrt"}})
    assert load_stage("annotate") is AnnotateStage
    assert set(BACKENDS) == {"onnxruntime", "mmdet"}
    with pytest.raises(KeyError, match="known"):
        backend_class("tensorrt")


def test_preflight_says_how_to_provide_onnx_weights(tmp_path):
    no_path = AnnotateConfig.model_validate({"detector": {"backend": "onnxruntime"}})
    with pytest.raises(StageSetupError, match="detector.path"):
        AnnotateStage.preflight(no_path)
    missing = AnnotateConfig.model_validate({"detector": {"backend": "onnxruntime", "path": str(tmp_path / "x.onnx")}})
    with pytest.raises(StageSetupError, match="not found.*export"):
        AnnotateStage.preflight(missing)


# --- the stage with a stand-in backend (faults) -----------------------------------------------------------------------

class StandInBackend(DetectorBackend):
    """Returns one box per image; raises on images whose top-left pixel is pure red (to test batch isolation)."""

    name = "stand-in"

    def __init__(self, label=0):
        super().__init__(None)
        self.label = label
        self.batches = []

    @classmethod
    def preflight(cls, config):
        pass

    @property
    def model_id(self):
        return "stand-in@0"

    def detect(self, images):
        self.batches.append(len(images))
        out = []
        for img in images:
            if tuple(img[0, 0]) == (0, 0, 255):
                raise RuntimeError("boom")
            h, w = img.shape[:2]
            out.append([det(self.label, 0.9, (1, 1, w + 20, h / 2)), det(self.label, 0.1)])
        return out


def write_image(path, colour=(0, 128, 0), size=(40, 30)):
    Image.new("RGB", size, colour).save(path)
    return str(path)


def make_stage(backend, **cfg):
    stage = AnnotateStage(AnnotateConfig.model_validate({"detector": {"backend": "onnxruntime", "path": "x"}, **cfg}))
    stage.attach(backend)
    return stage


def test_bad_images_become_errors_and_nothing_is_lost(tmp_path):
    good = write_image(tmp_path / "good.png")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("hello")
    records = [empty_record(id="good", source="t", image={"path": good}),
               empty_record(id="missing", source="t", image={"path": str(tmp_path / "nope.jpg")}),
               empty_record(id="corrupt", source="t", image={"path": str(corrupt)}),
               empty_record(id="empty", source="t", image={"path": str(empty)}),
               empty_record(id="text", source="t", image={"path": str(text)}),
               empty_record(id="no-image", source="t"),
               empty_record(id="dropped", source="t", status=STATUS_DROPPED, image={"path": good})]
    stage = make_stage(StandInBackend())
    out = stage(records)
    assert [r["id"] for r in out] == [r["id"] for r in records]
    by_id = {r["id"]: r for r in out}
    assert by_id["good"]["status"] == STATUS_OK
    assert by_id["good"]["detections"]["boxes"] == [{"label": "person", "score": pytest.approx(0.9),
                                                     "box": [1.0, 1.0, 40.0, 15.0]}]
    assert by_id["good"]["image"]["width"] == 40 and by_id["good"]["image"]["height"] == 30
    assert by_id["good"]["lineage"][-1]["stage"] == "annotate"
    assert "not found" in by_id["missing"]["error"]
    for bad in ("corrupt", "empty", "text"):
        assert by_id[bad]["status"] == STATUS_ERROR and "cannot decode" in by_id[bad]["error"], bad
        assert by_id[bad]["error_stage"] == "annotate"
    assert "no image path" in by_id["no-image"]["error"]
    assert by_id["dropped"]["status"] == STATUS_DROPPED and by_id["dropped"]["detections"] is None
    assert stage.stats["error_image"] == 4 and stage.stats["error_no_image"] == 1 and stage.stats["annotated"] == 1
    records_to_table(out)  # every field fits the schema


def test_a_failing_image_does_not_take_its_batch_down(tmp_path):
    paths = [write_image(tmp_path / f"{i}.png", (255, 0, 0) if i == 2 else (0, 128, 0)) for i in range(5)]
    backend = StandInBackend()
    stage = make_stage(backend, inference_batch_size=4)
    out = stage([empty_record(id=str(i), source="t", image={"path": p}) for i, p in enumerate(paths)])
    assert [r["status"] for r in out] == ["ok", "ok", "error", "ok", "ok"]
    assert "boom" in out[2]["error"] and stage.stats["error_model"] == 1
    assert backend.batches == [4, 1, 1, 1, 1, 1]  # the failing batch of 4 retried image by image, then the fifth


def test_malformed_model_output_is_an_error_on_the_record(tmp_path):
    stage = make_stage(StandInBackend(label=7), class_names=["cat", "dog"])
    stage.class_names = ["cat", "dog"]
    out = stage([empty_record(id="a", source="t", image={"path": write_image(tmp_path / "a.png")})])
    assert out[0]["status"] == STATUS_ERROR and "class index 7" in out[0]["error"]
    assert stage.stats["error_model_output"] == 1


def test_fixed_batch_exports_run_in_padded_chunks():
    from gmner_pipeline.stages.annotate.onnx_backend import OnnxBackend

    class FixedBatchSession:
        def __init__(self):
            self.seen = []

        def run(self, _names, feeds):
            x = feeds["input"]
            assert len(x) == 3, "a fixed-batch model only takes its own batch size"
            self.seen.append(x[:, 0, 0, 0].tolist())
            return [x[:, 0, 0, 0] * 2]

    backend = object.__new__(OnnxBackend)  # only _run is under test: no model file needed
    backend.session, backend.input_name, backend.static_batch = FixedBatchSession(), "input", 3
    batch = np.arange(5, dtype=np.float32).reshape(5, 1, 1, 1)
    (out,) = backend._run(batch)
    assert out.tolist() == [0, 2, 4, 6, 8]
    assert backend.session.seen == [[0, 1, 2], [3, 4, 4]]


def test_decoding_applies_exif_rotation_and_gives_bgr(tmp_path):
    from gmner_pipeline.stages.annotate.images import load_bgr

    img = Image.new("RGB", (40, 20), (255, 0, 0))  # red, landscape
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    img.save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    img.save(tmp_path / "plain.png")
    rotated, plain = load_bgr(tmp_path / "rotated.jpg"), load_bgr(tmp_path / "plain.png")
    assert rotated.shape == (40, 20, 3) and plain.shape == (20, 40, 3)
    assert tuple(plain[0, 0]) == (0, 0, 255)  # BGR
