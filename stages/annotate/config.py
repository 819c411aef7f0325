"""Typed config of the annotate stage: one section per detector backend, chosen by ``backend``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import Field, model_validator

from gmner_pipeline.configbase import Strict
from gmner_pipeline.hashing import file_sha256
from gmner_pipeline.stage import StageConfig

from . import packaged

# mmdet's RTMDet data_preprocessor (COCO configs): BGR input, these means/stds in BGR order.
RTMDET_MEAN_BGR = (103.53, 116.28, 123.675)
RTMDET_STD_BGR = (57.375, 57.12, 58.395)


class OnnxDetectorConfig(Strict):
    """An RTMDet ONNX export run by onnxruntime, with the model's own preprocessing (defaults: mmdet's RTMDet)."""

    backend: Literal["onnxruntime"] = "onnxruntime"
    path: Optional[str] = Field(
        None, description="the .onnx file (required), or packaged:rtmdet-nano-person for the detector that ships with "
        "the package (a person-only RTMDet-nano; its preprocessing comes with it)")
    output_format: Literal["auto", "end2end", "raw_head"] = Field(
        "auto",
        description="end2end: mmdeploy's dets [b,n,5] + labels [b,n] (NMS inside); raw_head: per-level class logits "
        "[b,C,H,W] then box distances [b,4,H,W] (decoded and NMS'd here); auto: recognised from the outputs",
    )
    input_size: Optional[tuple[int, int]] = Field(
        None, description="model input (height, width); default: the model's static size, else 640x640")
    channel_order: Literal["bgr", "rgb"] = Field("bgr", description="channel order the model was trained on")
    mean: tuple[float, float, float] = Field(RTMDET_MEAN_BGR, description="per channel, in the model's channel order")
    std: tuple[float, float, float] = Field(RTMDET_STD_BGR, description="per channel, in the model's channel order")
    pad_value: float = 114.0
    pad_position: Literal["corner", "center"] = Field("corner", description="corner = mmdet's Pad (bottom/right)")
    # raw_head decoding (mmdet's RTMDet test_cfg)
    strides: list[int] = Field(default_factory=lambda: [8, 16, 32])
    raw_score_threshold: float = Field(0.001, ge=0, description="raw_head: candidate score floor before NMS")
    nms_pre: int = Field(30000, ge=1, description="raw_head: candidates kept per level before NMS")
    nms_iou: float = Field(0.65, gt=0, le=1, description="raw_head: NMS IoU threshold")
    max_per_image: int = Field(300, ge=1, description="raw_head: boxes kept after NMS")
    providers: Optional[list[str]] = Field(None, description="onnxruntime providers; default: CUDA when available, "
                                           "else CPU")
    intra_op_threads: int = Field(0, ge=0, description="onnxruntime intra-op threads (0 = its default)")

    @model_validator(mode="before")
    @classmethod
    def _packaged_preprocessing(cls, values: object) -> object:
        # a packaged export's own letterbox size, channel order and mean/std, unless the config says otherwise
        return packaged.with_packaged_settings(values) if isinstance(values, dict) else values

    def model_file(self) -> Optional[Path]:
        return packaged.resolve_path(self.path) if self.path else None


class MmdetDetectorConfig(Strict):
    """RTMDet (or another mmdet detector whose ops the mmcv shim covers) through mmdet's own inference API."""

    backend: Literal["mmdet"] = "mmdet"
    model: str = Field("rtmdet_l_8xb32-300e_coco",
                       description="an mmdet model-zoo name (e.g. rtmdet_tiny_8xb32-300e_coco) or a config file path")
    checkpoint: Optional[str] = Field(
        None, description="local .pth path or URL; default: the model zoo's weights for `model` (downloaded once to "
        "the torch hub cache, in preflight)")
    device: str = Field("auto", description="auto (cuda when available), cpu, cuda, cuda:1, ...")


DetectorConfig = Annotated[Union[MmdetDetectorConfig, OnnxDetectorConfig], Field(discriminator="backend")]


class AnnotateConfig(StageConfig):
    detector: DetectorConfig = Field(default_factory=MmdetDetectorConfig)
    top_k: int = Field(5, ge=1, description="boxes kept per image (VKEL: 5; more than 10 hurt)")
    score_threshold: float = Field(0.3, ge=0, le=1, description="boxes below this score are never kept")
    class_names: Optional[list[str]] = Field(
        None, description="label index -> name; default: the model's metadata, else COCO-80")
    inference_batch_size: int = Field(8, ge=1, description="images per forward pass")
    decode_workers: int = Field(2, ge=1, description="threads decoding the next batch's images during inference")
    annotation_coordinates: Literal["pixels", "normalized"] = Field(
        "pixels", description="coordinates in annotation_text (boxes themselves are always original pixels)")

    def key_payload(self) -> dict[str, Any]:
        # the ONNX file's content, not only its name: a new export at the same path (or a packaged model replaced in
        # a new release) recomputes the boxes
        payload = super().key_payload()
        if isinstance(self.detector, OnnxDetectorConfig):
            model = self.detector.model_file()
            if model is not None and model.is_file():
                payload["detector_sha256"] = file_sha256(model)
        return payload
