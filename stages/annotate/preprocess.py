"""The detector's own input preprocessing as pure functions: keep-ratio resize + pad (mmdet's Resize + Pad, i.e. a
letterbox), channel order, mean/std, and the inverse mapping of boxes back to original pixels."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import cv2
import numpy as np


class Letterbox(NamedTuple):
    scale_x: float  # resized width / original width (differs from scale_y by the rounding to whole pixels)
    scale_y: float
    pad_x: int  # left padding, pixels of the model input
    pad_y: int  # top padding


def letterbox(image: np.ndarray, size: tuple[int, int], pad_value: float = 114.0,
              center: bool = False) -> tuple[np.ndarray, Letterbox]:
    """Resize ``image`` (H, W, 3) keeping its aspect ratio to fit ``size`` = (height, width), then pad to ``size``.

    Same arithmetic as mmdet's ``Resize(keep_ratio=True)`` + ``Pad`` (bilinear, size rounded half up, padding at
    the bottom/right) unless ``center`` puts the image in the middle (some exports were made that way).
    """
    out_h, out_w = size
    h, w = image.shape[:2]
    scale = min(out_h / h, out_w / w)
    new_w, new_h = int(w * scale + 0.5), int(h * scale + 0.5)
    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR) if (new_w, new_h) != (w, h) else image
    pad_x = (out_w - new_w) // 2 if center else 0
    pad_y = (out_h - new_h) // 2 if center else 0
    canvas = np.full((out_h, out_w, image.shape[2]), pad_value, dtype=image.dtype)
    canvas[pad_y:pad_y + new_h, pad_x:pad_x + new_w] = resized
    return canvas, Letterbox(new_w / w, new_h / h, pad_x, pad_y)


def to_model_input(images_bgr: Sequence[np.ndarray], channel_order: str, mean: Sequence[float],
                   std: Sequence[float]) -> np.ndarray:
    """Letterboxed uint8 BGR images -> float32 NCHW batch in the model's channel order, normalised.

    ``mean``/``std`` are given in the model's channel order (as in mmdet's data_preprocessor after bgr_to_rgb).
    """
    batch = np.stack(images_bgr)
    if channel_order == "rgb":
        batch = batch[..., ::-1]
    batch = (batch.astype(np.float32) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))


def boxes_to_original(boxes: np.ndarray, lb: Letterbox) -> np.ndarray:
    """Model-input pixel boxes (N, 4) -> original-image pixels (undo padding, then scaling)."""
    out = boxes.astype(np.float64).copy()
    out[:, [0, 2]] = (out[:, [0, 2]] - lb.pad_x) / lb.scale_x  # per-axis, as mmdet's scale_factor
    out[:, [1, 3]] = (out[:, [1, 3]] - lb.pad_y) / lb.scale_y
    return out
