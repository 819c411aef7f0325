"""RTMDet ONNX exports run by onnxruntime: mmdeploy's end2end format (NMS inside) and raw-head exports (decoded and
NMS'd by ``raw_head``), with the model's own letterbox, channel order and mean/std."""

from __future__ import annotations

import ast
import json
import logging
from typing import Sequence

import numpy as np

from gmner_pipeline.hashing import file_sha256
from gmner_pipeline.stage import StageSetupError

from .backends import DetectorBackend
from .boxes import RawDetection
from .config import OnnxDetectorConfig
from .packaged import packaged_class_names
from .preprocess import boxes_to_original, letterbox, to_model_input
from .raw_head import decode_rtmdet

logger = logging.getLogger(__name__)

DEFAULT_INPUT_SIZE = (640, 640)
_CLASS_METADATA_KEYS = ("classes", "class_names", "names", "labels")


def parse_class_metadata(metadata: dict[str, str]) -> list[str] | None:
    """Class names stored in ONNX metadata: a JSON/Python list, an {index: name} dict, or comma-separated text."""
    for key in _CLASS_METADATA_KEYS:
        raw = metadata.get(key)
        if not raw:
            continue
        value = None
        for parse in (json.loads, ast.literal_eval):
            try:
                value = parse(raw)
                break
            except (ValueError, SyntaxError):
                continue
        if isinstance(value, dict):
            return [str(value[k]) for k in sorted(value, key=int)]
        if isinstance(value, (list, tuple)):
            return [str(v) for v in value]
        return [part.strip() for part in raw.split(",") if part.strip()]
    return None


def detect_output_format(output_shapes: Sequence[Sequence]) -> str:
    """'end2end' for (dets [b,n,5], labels [b,n]); 'raw_head' for an even number of 4-D maps."""
    if len(output_shapes) == 2 and len(output_shapes[0]) == 3 and len(output_shapes[1]) == 2:
        return "end2end"
    if output_shapes and len(output_shapes) % 2 == 0 and all(len(s) == 4 for s in output_shapes):
        return "raw_head"
    raise StageSetupError(
        f"cannot recognise this ONNX export's outputs (shapes {list(map(list, output_shapes))}): expected mmdeploy "
        "end2end (dets [b,n,5], labels [b,n]) or raw RTMDet head maps (class maps then box maps, [b,C,H,W] and "
        "[b,4,H,W] per level); set detector.output_format if it is one of these"
    )


def split_raw_head_outputs(names: Sequence[str]) -> tuple[list[int], list[int]]:
    """Which outputs are class maps and which box maps: by name when the names say so, else first half / second half
    (the order of mmdet's ``(cls_scores, bbox_preds)``)."""
    half = len(names) // 2
    cls = [i for i, n in enumerate(names) if "cls" in n.lower() or "score" in n.lower()]
    box = [i for i, n in enumerate(names) if i not in cls and ("box" in n.lower() or "reg" in n.lower())]
    if len(cls) == len(box) == half:
        return cls, box
    return list(range(half)), list(range(half, len(names)))


class OnnxBackend(DetectorBackend):
    name = "onnxruntime"

    @classmethod
    def preflight(cls, config: OnnxDetectorConfig) -> None:
        if not config.path:
            raise StageSetupError(
                "stages.annotate.detector.path is not set: give the RTMDet .onnx file, e.g. an mmdeploy end2end "
                "export (see docs/annotate.md, 'Providing weights')")
        if not config.model_file().is_file():
            raise StageSetupError(
                f"ONNX model not found at {config.path}: export RTMDet with mmdeploy (end2end) or torch.onnx.export "
                "and set stages.annotate.detector.path to the file (see docs/annotate.md)")

    def __init__(self, config: OnnxDetectorConfig):
        super().__init__(config)
        import onnxruntime as ort

        self.preflight(config)
        path = config.model_file()
        options = ort.SessionOptions()
        if config.intra_op_threads:
            options.intra_op_num_threads = config.intra_op_threads
        available = ort.get_available_providers()
        providers = config.providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                                         if p in available]
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        self._model_id = f"{path.name}@sha256:{file_sha256(path)[:12]}"
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        batch_dim, _, h, w = model_input.shape
        self.static_batch = batch_dim if isinstance(batch_dim, int) else None
        static_hw = (h, w) if isinstance(h, int) and isinstance(w, int) else None
        if config.input_size and static_hw and tuple(config.input_size) != static_hw:
            raise StageSetupError(f"detector.input_size {config.input_size} differs from the model's fixed input "
                                  f"{static_hw}; remove input_size or re-export the model")
        self.input_hw = tuple(config.input_size or static_hw or DEFAULT_INPUT_SIZE)
        outputs = self.session.get_outputs()
        self.output_names = [o.name for o in outputs]
        self.output_format = (config.output_format if config.output_format != "auto"
                              else detect_output_format([o.shape for o in outputs]))
        self.cls_outputs, self.box_outputs = split_raw_head_outputs(self.output_names)
        self._class_names = (parse_class_metadata(self.session.get_modelmeta().custom_metadata_map)
                             or packaged_class_names(config.path))
        logger.info("onnxruntime detector %s: %s format, input %s, providers %s", self._model_id,
                    self.output_format, self.input_hw, self.session.get_providers())

    def preprocess(self, images: Sequence[np.ndarray]):
        cfg = self.config
        boxed = [letterbox(img, self.input_hw, cfg.pad_value, cfg.pad_position == "center") for img in images]
        batch = to_model_input([b for b, _ in boxed], cfg.channel_order, cfg.mean, cfg.std)
        return batch, [lb for _, lb in boxed]

    def detect(self, images: Sequence[np.ndarray]) -> list[list[RawDetection]]:
        batch, boxes_info = self.preprocess(images)
        outputs = self._run(batch)
        results = []
        for i, lb in enumerate(boxes_info):
            boxes, scores, labels = self._postprocess(outputs, i)
            boxes = boxes_to_original(boxes, lb)
            results.append([RawDetection(int(label), float(s), tuple(b))
                            for b, s, label in zip(boxes, scores, labels, strict=True)])
        return results

    def _run(self, batch: np.ndarray) -> list[np.ndarray]:
        size = self.static_batch
        if size is None or size == len(batch):
            return self.session.run(None, {self.input_name: batch})
        # A fixed-batch export: run chunks of its own size, the last one padded by repeating its final image.
        chunks = []
        for start in range(0, len(batch), size):
            chunk = batch[start:start + size]
            filled = np.concatenate([chunk, np.repeat(chunk[-1:], size - len(chunk), axis=0)])
            chunks.append([out[:len(chunk)] for out in self.session.run(None, {self.input_name: filled})])
        return [np.concatenate([c[k] for c in chunks]) for k in range(len(chunks[0]))]

    def _postprocess(self, outputs: list[np.ndarray], i: int):
        if self.output_format == "end2end":
            dets, labels = outputs[0][i], outputs[1][i]
            if dets.ndim != 2 or dets.shape[1] != 5 or labels.shape[0] != dets.shape[0]:
                raise ValueError(f"malformed end2end output: dets {dets.shape}, labels {labels.shape}")
            valid = dets[:, 4] > 0  # mmdeploy pads every image of a batch to the same number of rows
            return dets[valid, :4], dets[valid, 4], labels[valid].astype(np.int64)
        cfg = self.config
        return decode_rtmdet([outputs[k][i] for k in self.cls_outputs], [outputs[k][i] for k in self.box_outputs],
                             cfg.strides,
                             self.input_hw, cfg.raw_score_threshold, cfg.nms_pre, cfg.nms_iou, cfg.max_per_image)
