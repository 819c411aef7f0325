"""The detector that ships with the package (stages/annotate/models): the default config's annotate step on the
bundled sample's real photos, with no file from outside the package."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from gmner_pipeline.cli import app
from gmner_pipeline.config import load_config
from gmner_pipeline.hashing import file_sha256
from gmner_pipeline.report import find_record
from gmner_pipeline.stages.annotate import AnnotateConfig
from gmner_pipeline.stages.annotate.packaged import MODELS_DIR, PACKAGED

pytest.importorskip("onnxruntime", reason="the detect extra is not installed")
pytestmark = pytest.mark.integration

SHA256 = "4720eda18a18402e7b76d85827d4bc60fba18111fc0b74b559e4d24da9ddc3d2"  # models/PROVENANCE.md


def iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_the_packaged_model_is_the_one_its_provenance_names():
    model = MODELS_DIR / PACKAGED["rtmdet-nano-person"].file
    assert file_sha256(model) == SHA256
    assert (MODELS_DIR / "PROVENANCE.md").read_text().count(SHA256) == 1
    assert "Apache License" in (MODELS_DIR / "LICENSE-Apache-2.0.txt").read_text()


def test_the_default_run_annotates_with_the_packaged_detector_and_its_own_preprocessing():
    config = load_config("sample").stages["annotate"]  # the CLI's default config
    assert config.detector.path == "packaged:rtmdet-nano-person"
    assert (config.detector.channel_order, config.detector.input_size) == ("rgb", (320, 320))
    # a setting the user gives wins over the packaged one
    custom = AnnotateConfig.model_validate({"detector": {"backend": "onnxruntime", "path": config.detector.path,
                                                         "input_size": [640, 640]}})
    assert custom.detector.input_size == (640, 640)
    # the key follows the file's content, not its name
    assert config.key_payload()["detector_sha256"] == SHA256


def test_an_unknown_packaged_name_lists_the_packaged_detectors():
    with pytest.raises(ValueError, match="packaged:rtmdet-nano-person"):
        AnnotateConfig.model_validate({"detector": {"backend": "onnxruntime", "path": "packaged:yolo"}})


def test_run_annotate_with_no_config_finds_the_astronaut(tmp_path, ray_local):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", "annotate", "--output", str(out), "--set", "run.progress=false"])
    assert result.exit_code == 0, result.output
    astronaut = find_record(out, "gmner-sample/train/astronaut")["detections"]
    best = max(astronaut["boxes"], key=lambda b: b["score"])
    # PROVENANCE.md's reference: person 0.76 at [13, 15, 365, 511] (skimage's astronaut photo)
    assert best["label"] == "person" and best["score"] == pytest.approx(0.76, abs=0.02)
    assert iou(best["box"], [13, 15, 365, 511]) > 0.9
    assert find_record(out, "gmner-sample/train/rocket")["detections"]["boxes"] == []
