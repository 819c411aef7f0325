"""Pure keep/drop logic of VKEL eq. 2: the best-scoring candidate is kept when its cosine reaches alpha."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

NO_CANDIDATES = "no_candidates"
BELOW_ALPHA = "below_alpha"
DOWNLOAD_FAILED = "download_failed"
UNREADABLE_IMAGE = "unreadable_image"
TOO_LONG = "too_long"


@dataclass(frozen=True)
class Decision:
    chosen: int | None  # index of the kept candidate
    best_score: float | None  # the top-1 cosine, also when it is below alpha
    drop_reason: str | None


def cosine_scores(text_embedding: np.ndarray, image_embeddings: np.ndarray) -> np.ndarray:
    """Cosine of one text with each image; inputs need not be normalised; NaN rows (failed images) stay NaN."""
    t = text_embedding / max(float(np.linalg.norm(text_embedding)), 1e-12)
    norms = np.linalg.norm(image_embeddings, axis=1, keepdims=True)
    return (image_embeddings / np.maximum(norms, 1e-12)) @ t


def decide(scores: Sequence[float | None], failures: Sequence[str | None], alpha: float) -> Decision:
    """``scores[i]`` is candidate i's cosine (None/NaN when it failed with ``failures[i]``). Ties keep the earlier
    (higher-ranked) candidate. A sample whose every candidate failed is dropped for the failure seen: download_failed
    when any download failed, else unreadable_image."""
    if not scores:
        return Decision(None, None, NO_CANDIDATES)
    best: int | None = None
    for i, score in enumerate(scores):
        if score is None or math.isnan(score):
            continue
        if best is None or score > scores[best]:  # type: ignore[operator]
            best = i
    if best is None:
        reason = DOWNLOAD_FAILED if DOWNLOAD_FAILED in failures else UNREADABLE_IMAGE
        return Decision(None, None, reason)
    top = float(scores[best])  # type: ignore[arg-type]
    if top < alpha:
        return Decision(None, top, BELOW_ALPHA)
    return Decision(best, top, None)
