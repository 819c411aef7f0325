"""Box geometry: IoU between boxes and between box sets (an entity may have several boxes).

A box is ``(x1, y1, x2, y2)``, top-left and bottom-right corners. A box with x2 <= x1 or y2 <= y1 has no area: its IoU
with anything is 0 (a malformed prediction earns nothing, and nothing raises). So is the IoU of boxes whose areas
overflow a float (coordinates near 1e300): inf / inf must not come out as a perfect match.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

Box = Sequence[float]
PredBoxPolicy = Literal["all", "any", "first"]


def area(box: Box) -> float:
    return max(0.0, float(box[2]) - float(box[0])) * max(0.0, float(box[3]) - float(box[1]))


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes, in [0, 1]."""
    iw = min(float(a[2]), float(b[2])) - max(float(a[0]), float(b[0]))
    ih = min(float(a[3]), float(b[3])) - max(float(a[1]), float(b[1]))
    inter = max(0.0, iw) * max(0.0, ih)
    union = area(a) + area(b) - inter
    if union <= 0.0 or inter <= 0.0 or not math.isfinite(union):
        return 0.0
    value = inter / union
    return min(1.0, value) if math.isfinite(value) else 0.0


def best_iou(box: Box, gold: Sequence[Box]) -> float:
    """IoU of one box with the best-matching of several gold boxes (0 when there is none)."""
    return max((iou(box, g) for g in gold), default=0.0)


def location_iou(pred: Sequence[Box] | None, gold: Sequence[Box] | None, policy: PredBoxPolicy = "all") -> float:
    """IoU between a predicted box set and a gold box set; 0 when either side has no box.

    Each predicted box is scored against its best gold box ("IoU with ANY gold box"). Several predicted boxes are
    combined by ``policy``: ``all`` (default) takes the worst of them, so listing extra wrong boxes never pays;
    ``any`` the best; ``first`` only the first box. With one predicted box the three agree.
    """
    if not pred or not gold:
        return 0.0
    if policy == "first":
        return best_iou(pred[0], gold)
    scores = [best_iou(p, gold) for p in pred]
    return min(scores) if policy == "all" else max(scores)


def passes(value: float, threshold: float, strict: bool = False) -> bool:
    """``value >= threshold`` (E2E-GMNER, RiVEG) or, with ``strict``, ``value > threshold`` (H-Index)."""
    return value > threshold if strict else value >= threshold


def scale_box(box: Box, sx: float, sy: float) -> tuple[float, float, float, float]:
    return (float(box[0]) * sx, float(box[1]) * sy, float(box[2]) * sx, float(box[3]) * sy)
