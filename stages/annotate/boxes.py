"""Pure functions on detections: class names, score filtering and top-K, clipping, normalisation, NMS, and the ONE
function that writes the annotation text later prompts see."""

from __future__ import annotations

from typing import Iterable, NamedTuple, Sequence

import numpy as np

from gmner_pipeline.answer import format_box

# COCO-80 in the contiguous index order mmdet, mmdeploy and most exports use (label i -> COCO_CLASSES[i]).
COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)

Box = tuple[float, float, float, float]


class RawDetection(NamedTuple):
    """What a backend returns per box: class index, score, box (x1, y1, x2, y2) in ORIGINAL image pixels."""

    label: int
    score: float
    box: Box


class MalformedDetection(ValueError):
    """The model produced something that cannot be a detection (unknown class index, NaN box)."""


def clip_box(box: Sequence[float], width: int, height: int) -> Box:
    x1, y1, x2, y2 = (float(v) for v in box)
    return (min(max(x1, 0.0), width), min(max(y1, 0.0), height), min(max(x2, 0.0), width), min(max(y2, 0.0), height))


def select_top_k(dets: Iterable[RawDetection], k: int, score_threshold: float) -> list[RawDetection]:
    """The ``k`` highest-scoring detections with score >= threshold, best first (ties keep model order)."""
    kept = [d for d in dets if d.score >= score_threshold]
    kept.sort(key=lambda d: -d.score)
    return kept[:k]


def to_schema_boxes(dets: Iterable[RawDetection], class_names: Sequence[str], width: int,
                    height: int) -> list[dict]:
    """RawDetections -> the schema's ``detections.boxes`` items, clipped to the image; raises MalformedDetection."""
    out = []
    for det in dets:
        if not 0 <= det.label < len(class_names):
            raise MalformedDetection(
                f"model predicted class index {det.label}, but only {len(class_names)} class names are known; "
                "set stages.annotate.class_names to the model's classes"
            )
        if not np.all(np.isfinite(det.box)) or not np.isfinite(det.score):
            raise MalformedDetection(f"model produced a non-finite box or score: {det}")
        x1, y1, x2, y2 = clip_box(det.box, width, height)
        out.append({"label": class_names[det.label], "score": float(det.score), "box": [x1, y1, x2, y2]})
    return out


def normalise_box(box: Sequence[float], width: int, height: int) -> Box:
    """Pixels -> fractions of the image size in [0, 1] (derived on demand; records keep pixels)."""
    x1, y1, x2, y2 = box
    return (x1 / width, y1 / height, x2 / width, y2 / height)


def annotation_text(boxes: Iterable[dict], *, normalise_to: tuple[int, int] | None = None,
                    separator: str = "; ") -> str:
    """The ``class: [x1,y1,x2,y2]`` list given to prompts, best box first.

    Pixel boxes are written as whole pixels; with ``normalise_to=(width, height)`` as fractions with 3 decimals.
    An image without detections gives the empty string.
    """
    parts = []
    for item in boxes:
        if normalise_to is not None:
            box = "[" + ",".join(f"{v:.3f}" for v in normalise_box(item["box"], *normalise_to)) + "]"
        else:
            box = format_box(item["box"])
        parts.append(f"{item['label']}: {box}")
    return separator.join(parts)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, max_keep: int | None = None) -> np.ndarray:
    """Greedy NMS (torchvision's semantics: IoU > threshold suppresses); indices of kept boxes, highest score first.

    ``max_keep`` stops once that many are kept: the same first boxes as a full NMS, in O(max_keep * N).
    """
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    boxes = boxes.astype(np.float64)
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1) * (y2 - y1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        if max_keep is not None and len(keep) >= max_keep:
            break
        rest = order[1:]
        w = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        h = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = w * h
        iou = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-12)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def batched_nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou_threshold: float,
                max_keep: int | None = None) -> np.ndarray:
    """Class-aware NMS: boxes of different classes never suppress each other (offset trick, as mmcv/torchvision)."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = labels.astype(np.float64)[:, None] * (float(boxes.max()) + 1.0)
    return nms(boxes + offsets, scores, iou_threshold, max_keep)
