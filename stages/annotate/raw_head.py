"""Decoding RTMDet's raw head outputs (what a plain ``torch.onnx.export`` of backbone+neck+head gives) the way
mmdet's ``RTMDetHead.predict_by_feat`` does: sigmoid class scores per prior point, distance-to-box decoding, per-level
top candidates, class-aware NMS."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .boxes import batched_nms


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def decode_rtmdet(cls_logits: Sequence[np.ndarray], box_dists: Sequence[np.ndarray], strides: Sequence[int],
                  input_hw: tuple[int, int], score_threshold: float, nms_pre: int, iou_threshold: float,
                  max_per_image: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image: per-level ``cls_logits`` [C, H, W] and ``box_dists`` [4, H, W] (left, top, right, bottom in
    input pixels) -> (boxes [N, 4] in input pixels, scores [N], labels [N]), best first."""
    if not (len(cls_logits) == len(box_dists) == len(strides)):
        raise ValueError(f"raw head: {len(cls_logits)} class maps, {len(box_dists)} box maps, {len(strides)} strides")
    all_boxes, all_scores, all_labels = [], [], []
    for logits, dists, stride in zip(cls_logits, box_dists, strides, strict=True):
        num_classes, h, w = logits.shape
        if dists.shape != (4, h, w):
            raise ValueError(f"raw head: box map {dists.shape} does not match class map {logits.shape}")
        scores = _sigmoid(logits.astype(np.float32)).reshape(num_classes, -1).T  # [H*W, C], row-major priors
        dist = dists.reshape(4, -1).T
        # Every (prior, class) pair above the floor is a candidate (multi-label), as mmdet's filter_scores_and_topk.
        prior_idx, label_idx = np.nonzero(scores > score_threshold)
        cand = scores[prior_idx, label_idx]
        if cand.size > nms_pre:
            top = np.argpartition(-cand, nms_pre - 1)[:nms_pre]
            prior_idx, label_idx, cand = prior_idx[top], label_idx[top], cand[top]
        ys, xs = np.divmod(prior_idx, w)
        px, py = xs * float(stride), ys * float(stride)  # prior points, offset 0 (MlvlPointGenerator)
        d = dist[prior_idx]
        boxes = np.stack([px - d[:, 0], py - d[:, 1], px + d[:, 2], py + d[:, 3]], axis=1)
        all_boxes.append(boxes)
        all_scores.append(cand)
        all_labels.append(label_idx)
    boxes = np.concatenate(all_boxes) if all_boxes else np.zeros((0, 4))
    scores = np.concatenate(all_scores) if all_scores else np.zeros(0)
    labels = np.concatenate(all_labels) if all_labels else np.zeros(0, dtype=np.int64)
    in_h, in_w = input_hw
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, in_w)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, in_h)
    keep = batched_nms(boxes, scores, labels, iou_threshold, max_keep=max_per_image)
    return boxes[keep], scores[keep], labels[keep]
