"""The onnxruntime backend on REAL weights: ../shared/models/rtmdet-nano-person.onnx (mmdeploy end2end) over the
photos in ../shared/images. Skipped when ../shared (beside the repository) is absent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime", reason="the detect extra is not installed")
cv2 = pytest.importorskip("cv2")

from PIL import Image  # noqa: E402

import conftest  # noqa: E402
from gmner_pipeline.schema import STATUS_ERROR, STATUS_OK, empty_record, records_to_table  # noqa: E402
from gmner_pipeline.stages.annotate import AnnotateConfig, AnnotateStage  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SHARED = conftest.SHARED  # ../shared beside the repository root (as in CI), or GMNER_SHARED_DIR
MODEL = SHARED / "models" / "rtmdet-nano-person.onnx"
IMAGES = SHARED / "images"

pytestmark = [pytest.mark.integration, pytest.mark.shared_data,
              pytest.mark.skipif(not MODEL.is_file(), reason=f"{MODEL} not present (../shared beside the repo)")]

SIZE = 320
# This export expects RGB input normalised with ImageNet mean/std in RGB order (it matches the reference detections
# in ../shared/models/PROVENANCE.md; BGR input shifts the scores by up to 0.2).
MEAN_RGB, STD_RGB = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
DETECTOR = {"backend": "onnxruntime", "path": str(MODEL), "input_size": [SIZE, SIZE], "channel_order": "rgb",
            "mean": list(MEAN_RGB), "std": list(STD_RGB)}

# PROVENANCE.md's reference detections (score >= 0.3), boxes in original pixels.
REFERENCE = {
    "astronaut.png": [(0.76, [13, 15, 365, 511]), (0.40, [0, 17, 72, 509])],
    "basketball1.png": [(0.84, [34, 82, 177, 478]), (0.68, [434, 21, 639, 479])],
    "grace_hopper.jpg": [(0.71, [11, 25, 512, 600])],
    "messi5.jpg": [(0.78, [64, 61, 457, 335])],
}
NOTHING = ["coffee.png", "home.jpg", "motorcycle.png", "rocket.png"]


def photo_paths():
    return sorted(str(p) for p in IMAGES.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))


def direct_onnxruntime(path: str, session) -> list[tuple[float, list[float]]]:
    """The model called by hand, batch of one: letterbox to 320 (top-left), RGB, normalise, run, undo the letterbox."""
    rgb = np.asarray(Image.open(path).convert("RGB"))
    h, w = rgb.shape[:2]
    scale = min(SIZE / h, SIZE / w)
    nw, nh = int(w * scale + 0.5), int(h * scale + 0.5)
    canvas = np.full((SIZE, SIZE, 3), 114, np.uint8)
    canvas[:nh, :nw] = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_LINEAR)
    x = ((canvas.astype(np.float32) - MEAN_RGB) / STD_RGB).transpose(2, 0, 1)[None].astype(np.float32)
    dets, _ = session.run(None, {session.get_inputs()[0].name: x})
    out = []
    for x1, y1, x2, y2, score in dets[0]:
        if score >= 0.3:
            box = [min(max(v, 0), lim) for v, lim in ((x1 * w / nw, w), (y1 * h / nh, h), (x2 * w / nw, w),
                                                      (y2 * h / nh, h))]
            out.append((float(score), box))
    return sorted(out, key=lambda item: -item[0])[:5]


def iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.fixture(scope="module")
def annotated():
    config = AnnotateConfig.model_validate({"detector": DETECTOR, "inference_batch_size": 4})
    AnnotateStage.preflight(config)
    stage = AnnotateStage(config)
    stage.setup()
    records = [empty_record(id=Path(p).name, source="shared", image={"path": p}) for p in photo_paths()]
    out = stage(records)
    stage.close()
    return {r["id"]: r for r in out}


def test_stage_boxes_equal_a_direct_onnxruntime_call_within_1px(annotated):
    session = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    for path in photo_paths():
        record = annotated[Path(path).name]
        assert record["status"] == STATUS_OK, record["error"]
        expected = direct_onnxruntime(path, session)
        got = record["detections"]["boxes"]
        assert len(got) == len(expected), path
        for item, (score, box) in zip(got, expected, strict=True):
            assert item["label"] == "person"
            assert item["score"] == pytest.approx(score, abs=1e-4)
            np.testing.assert_allclose(item["box"], box, atol=1.0, err_msg=path)


def test_person_photos_yield_their_person_boxes(annotated):
    for name, expected in REFERENCE.items():
        boxes = annotated[name]["detections"]["boxes"]
        for score, ref_box in expected:
            match = max(boxes, key=lambda b: iou(b["box"], ref_box))
            assert match["label"] == "person"
            assert iou(match["box"], ref_box) > 0.9, (name, match, ref_box)
            assert match["score"] == pytest.approx(score, abs=0.02), name
        assert annotated[name]["detections"]["annotation_text"].startswith("person: [")
    for name in NOTHING:
        assert annotated[name]["detections"]["boxes"] == [] and annotated[name]["detections"]["annotation_text"] == ""
    records_to_table(annotated.values())


def test_bad_images_among_real_ones(tmp_path):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes((IMAGES / "messi5.jpg").read_bytes()[:2000])  # truncated JPEG
    paths = [str(IMAGES / "astronaut.png"), str(corrupt), str(tmp_path / "missing.png"), str(IMAGES / "messi5.jpg")]
    stage = AnnotateStage(AnnotateConfig.model_validate({"detector": DETECTOR, "inference_batch_size": 4}))
    stage.setup()
    out = stage([empty_record(id=str(i), source="t", image={"path": p}) for i, p in enumerate(paths)])
    assert [r["status"] for r in out] == [STATUS_OK, STATUS_ERROR, STATUS_ERROR, STATUS_OK]
    assert "cannot decode" in out[1]["error"] and "not found" in out[2]["error"]
    assert out[0]["detections"]["boxes"][0]["label"] == "person" and out[3]["detections"]["boxes"]
    assert stage.stats["error_image"] == 2


@pytest.mark.skipif(not MODEL.is_file(), reason=f"{MODEL} absent")
def test_cli_run_annotate_on_the_bundled_sample(tmp_path, monkeypatch, ray_local):
    """`gmner-pipeline run synthesize --config sample_annotate`: sample -> annotate (real weights) -> template CoT."""
    from typer.testing import CliRunner

    from gmner_pipeline.cli import app
    from gmner_pipeline.report import find_record

    monkeypatch.setenv("RTMDET_ONNX", str(MODEL))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", "synthesize", "--config", "sample_annotate", "--output", str(out),
                                      "--set", "run.progress=false"])
    assert result.exit_code == 0, result.output
    rec = find_record(out, "gmner-sample/train/astronaut")
    labels = [b["label"] for b in rec["detections"]["boxes"]]
    assert "person" in labels and rec["detections"]["annotation_text"].startswith("person: [")
    assert rec["cot"]["chains"] and rec["status"] == "ok"
