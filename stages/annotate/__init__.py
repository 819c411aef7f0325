"""Stage 2, annotate: RTMDet object boxes (top-K, class names, original pixels) and their prompt text per image.

Modules: ``stage`` (the Stage class), ``config`` (typed config), ``boxes`` (pure box logic and the annotation text),
``preprocess`` (letterbox / normalisation), ``images`` (decoding), ``raw_head`` (RTMDet head decoding), ``backends``
(interface + registry), ``onnx_backend``, ``mmdet_backend``, ``mmcv_shim``.
"""

from .config import AnnotateConfig, MmdetDetectorConfig, OnnxDetectorConfig
from .stage import AnnotateStage, build_detections

__all__ = ["AnnotateConfig", "AnnotateStage", "MmdetDetectorConfig", "OnnxDetectorConfig", "build_detections"]
