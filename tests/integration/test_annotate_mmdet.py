"""The mmdet backend for real (mmdet's config, init_detector, test pipeline, test_step on mmcv-lite + our shim) on the
RTMDet-tiny architecture with random weights built offline, and a raw-head ONNX export of the same model checked
against it."""

from __future__ import annotations

import re

import numpy as np
import pytest

pytest.importorskip("mmdet", reason="the detect extra is not installed")

from gmner_pipeline.schema import STATUS_OK, empty_record, records_to_table  # noqa: E402
from gmner_pipeline.stage import StageSetupError  # noqa: E402
from gmner_pipeline.stages.annotate import AnnotateConfig, AnnotateStage  # noqa: E402

from annotate_models import BIASED_CLASS, CLASSES, build_rtmdet_tiny, export_raw_head  # noqa: E402

pytestmark = pytest.mark.integration
SIZE = 320


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_rtmdet_tiny(tmp_path_factory.mktemp("rtmdet"), size=SIZE)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Real photos that ship with scikit-image (a core dependency), one portrait and one landscape."""
    from PIL import Image
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for name, array in (("astronaut", data.astronaut()), ("coffee", data.coffee()), ("rocket", data.rocket())):
        path = folder / f"{name}.png"
        Image.fromarray(array).save(path)
        paths.append(str(path))
    return paths


def mmdet_config(tiny, **extra):
    config_path, checkpoint = tiny
    return AnnotateConfig.model_validate({"detector": {"backend": "mmdet", "model": str(config_path),
                                                       "checkpoint": str(checkpoint), "device": "cpu"}, **extra})


@pytest.fixture(scope="module")
def mmdet_stage(tiny):
    config = mmdet_config(tiny, inference_batch_size=2)
    AnnotateStage.preflight(config)
    stage = AnnotateStage(config)
    stage.setup()
    yield stage
    stage.close()


def test_mmdet_backend_through_the_stage(mmdet_stage, photos):
    stage = mmdet_stage
    assert list(stage.class_names) == list(CLASSES)  # from the checkpoint's dataset_meta
    records = [empty_record(id=str(i), source="t", image={"path": p}) for i, p in enumerate(photos)]
    out = stage(records)
    records_to_table(out)
    for record in out:
        assert record["status"] == STATUS_OK, record["error"]
        dets = record["detections"]
        assert dets["backend"] == "mmdet" and dets["model_id"].startswith("mmdet:rtmdet_tiny_test@")
        boxes = dets["boxes"]
        assert len(boxes) == 5
        assert {b["label"] for b in boxes} == {CLASSES[BIASED_CLASS]}
        scores = [b["score"] for b in boxes]
        assert scores == sorted(scores, reverse=True) and min(scores) >= 0.3
        w, h = record["image"]["width"], record["image"]["height"]
        for b in boxes:
            x1, y1, x2, y2 = b["box"]
            assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h
        assert re.fullmatch(r"(kite: \[\d+,\d+,\d+,\d+\](; )?){5}", dets["annotation_text"])


def test_raw_head_onnx_export_decodes_like_mmdet(tiny, mmdet_stage, photos, tmp_path):
    """Our raw-head decoding + NMS on an ONNX export equals mmdet's own post-processing of the same weights."""
    from gmner_pipeline.stages.annotate.config import OnnxDetectorConfig
    from gmner_pipeline.stages.annotate.images import load_bgr
    from gmner_pipeline.stages.annotate.onnx_backend import OnnxBackend

    config_path, checkpoint = tiny
    onnx_path = export_raw_head(config_path, checkpoint, tmp_path / "raw.onnx", size=SIZE)
    images = [load_bgr(p) for p in photos]
    expected = mmdet_stage.backend.detect(images)
    # RTMDet's default preprocessing (BGR, mmdet's mean/std, corner padding); the export has dynamic batch only.
    ours = OnnxBackend(OnnxDetectorConfig(path=str(onnx_path), input_size=(SIZE, SIZE)))
    assert ours.output_format == "raw_head"
    got = ours.detect(images)
    for exp, out in zip(expected, got, strict=True):
        assert len(out) == len(exp) == 300
        top_exp, top_out = exp[:50], out[:50]
        assert [d.label for d in top_out] == [d.label for d in top_exp]
        np.testing.assert_allclose([d.score for d in top_out], [d.score for d in top_exp], atol=1e-4)
        np.testing.assert_allclose([d.box for d in top_out], [d.box for d in top_exp], atol=1.0)


def test_missing_weights_fail_in_preflight_with_instructions(tiny, tmp_path, monkeypatch):
    config_path, _ = tiny
    missing = AnnotateConfig.model_validate(
        {"detector": {"backend": "mmdet", "model": str(config_path), "checkpoint": str(tmp_path / "no.pth")}})
    with pytest.raises(StageSetupError, match="checkpoint not found.*checkpoint to its path"):
        AnnotateStage.preflight(missing)

    # A model-zoo name: its weights URL comes from mmdet's metafile; offline the download fails -> clear message.
    import torch.hub

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)

    def offline(url, dst, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    zoo = AnnotateConfig.model_validate({"detector": {"backend": "mmdet", "model": "rtmdet_tiny_8xb32-300e_coco"}})
    with pytest.raises(StageSetupError, match=r"could not download .*rtmdet_tiny.*\.pth.*detector.checkpoint"):
        AnnotateStage.preflight(zoo)
    alias = AnnotateConfig.model_validate({"detector": {"backend": "mmdet", "model": "rtmdet-t"}})
    with pytest.raises(StageSetupError, match="could not download"):
        AnnotateStage.preflight(alias)
    with pytest.raises(StageSetupError, match="neither a config file nor an mmdet model-zoo name"):
        AnnotateStage.preflight(AnnotateConfig.model_validate({"detector": {"backend": "mmdet", "model": "nope"}}))


def test_mmcv_shim_nms_matches_torchvision_and_other_ops_say_why():
    import torch
    import torchvision

    from gmner_pipeline.stages.annotate import mmcv_shim

    mmcv_shim.install()
    from mmcv.ops import batched_nms, nms

    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(300, 2, generator=gen) * 100
    boxes = torch.cat([xy, xy + torch.rand(300, 2, generator=gen) * 40 + 1], 1)
    scores = torch.rand(300, generator=gen)
    dets, keep = nms(boxes, scores, 0.5)
    assert keep.tolist() == torchvision.ops.nms(boxes, scores, 0.5).tolist()
    labels = torch.randint(0, 3, (300,), generator=gen)
    _, keep_b = batched_nms(boxes, scores, labels, {"type": "nms", "iou_threshold": 0.5})
    assert keep_b.tolist() == torchvision.ops.batched_nms(boxes, scores, labels, 0.5).tolist()
    import mmcv

    if getattr(mmcv._ext, "__gmner_pipeline_shim__", False):
        with pytest.raises(NotImplementedError, match="compiled extension"):
            mmcv._ext.roi_align_forward()
