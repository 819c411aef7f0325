"""GRBP: Gaussian Risk-aware Box Perturbation of SFT box targets (E2E-GMNER §3.2.2; method-spec §Trainer).

Each time an example is put into a training batch, every gold box of its target answer is replaced by a perturbed copy:

* centre shift ``(cx + δx·w, cy + δy·h)`` and scale ``(w·(1 + δw), h·(1 + δh))``, each δ drawn independently from a
  Gaussian of σ = a/√3 truncated at ±``truncate``·σ (±2σ), with a = ``beta`` (0.1) for the centre and a = ``gamma``
  (0.1) for the scale;
* boxes smaller than ``small_side``² pixels in AREA (32×32, the COCO "small" rule: project decision) get
  ``small_factor`` (half) of the noise;
* the scale factor is clamped to ``scale_clamp`` ([0.2, 5.0]), the box kept at least ``min_size`` (2) pixels wide and
  high, clipped to the image and rounded to the integers the answer format writes;
* IoU guard: the perturbed box is accepted only if its IoU with the original is ≥ ``tau`` (0.6); otherwise it is drawn
  again, up to ``tries`` (5) times in all, and the original box is kept when every try fails.

Everything happens in the POLICY's coordinate frame (the target is already written in it): clipping uses the frame's
extent (``frames.frame_extent``) and the pixel rules (small boxes, 2 px) use the pixels of the image the model sees, so
a 0–1000 frame (Qwen2-VL) gets the same treatment as a pixel frame.

The reasoning text (project decision): a box literal in the ``<think>`` part that equals an answer box is replaced by
that box's perturbed copy, so the chain and its answer keep agreeing; every other literal in the reasoning (a detector
box quoted from the prompt, say) is left as written, because it is a fact from the input, not a target.

The noise is a pure function of (seed, epoch, example id): fresh every epoch, identical on a rerun, on resume and on
any number of processes. Nothing here touches the stored shards: the collator rewrites its own copy of the target.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from pydantic import Field, model_validator

from ..configbase import Frozen
from ..frames import map_box_literals

Box = tuple[float, float, float, float]

_ANSWER_BLOCK = re.compile(r"(<answer>)(.*?)(</answer>)", re.S | re.I)


class GRBPConfig(Frozen):
    """GRBP settings; the defaults are E2E-GMNER's."""

    enabled: bool = Field(True, description="perturb box targets during SFT (E2E-GMNER: removing GRBP cost 2.4 F1)")
    beta: float = Field(0.1, ge=0.0, description="centre noise a: δ ~ N(0, (a/√3)²) as a fraction of the box size")
    gamma: float = Field(0.1, ge=0.0, description="scale noise a: width and height are multiplied by (1 + δ)")
    truncate: float = Field(2.0, gt=0.0, description="δ is truncated at ±truncate·σ")
    tau: float = Field(0.6, ge=0.0, le=1.0, description="IoU guard: accept a perturbed box only at IoU ≥ tau")
    tries: int = Field(5, ge=1, description="draws before the original box is kept")
    small_side: float = Field(32.0, ge=0.0, description="boxes with an area under small_side² pixels are 'small'")
    small_factor: float = Field(0.5, ge=0.0, description="noise multiplier for small boxes")
    scale_clamp: tuple[float, float] = Field((0.2, 5.0), description="bounds of the scale factor 1 + δ")
    min_size: float = Field(2.0, ge=0.0, description="a perturbed box is at least this many pixels wide and high")

    @model_validator(mode="after")
    def _check(self) -> "GRBPConfig":
        lo, hi = self.scale_clamp
        if not 0 < lo <= 1 <= hi:
            raise ValueError(f"scale_clamp must satisfy 0 < low <= 1 <= high, got {self.scale_clamp}")
        return self


@dataclass(frozen=True)
class Geometry:
    """Where a target's boxes live: the frame's extent (right/bottom edge coordinates) and how many pixels of the
    image the model sees one frame unit spans (1 for pixel frames)."""

    extent_w: float
    extent_h: float
    px_per_unit_x: float = 1.0
    px_per_unit_y: float = 1.0

    @property
    def valid(self) -> bool:
        return self.extent_w > 0 and self.extent_h > 0 and self.px_per_unit_x > 0 and self.px_per_unit_y > 0


@dataclass
class GRBPStats:
    boxes: int = 0
    perturbed: int = 0
    kept_original: int = 0  # every try failed the IoU guard
    draws: int = 0
    small: int = 0
    notes: list[str] = field(default_factory=list)

    def add(self, other: "GRBPStats") -> None:
        self.boxes += other.boxes
        self.perturbed += other.perturbed
        self.kept_original += other.kept_original
        self.draws += other.draws
        self.small += other.small


def example_rng(seed: int, epoch: int, example_id: str) -> np.random.Generator:
    """The generator for one example in one epoch (sha256 of the id, never Python's salted hash)."""
    digest = int.from_bytes(hashlib.sha256(example_id.encode()).digest()[:8], "big")
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch & 0xFFFFFFFF, digest])


def truncated_normal(rng: np.random.Generator, sigma: float, bound: float, size: int) -> np.ndarray:
    """``size`` draws of N(0, sigma²) truncated at ±bound·sigma (all zeros when sigma is 0), by rejection: exact, and
    at ±2σ 95% of draws are accepted. (scipy's ``truncnorm.rvs`` gives the same law but costs ~100× more per small
    draw, and this runs for every box of every batch.)"""
    if sigma <= 0:
        return np.zeros(size)
    out = rng.standard_normal(size)
    outside = np.abs(out) > bound
    while outside.any():
        out[outside] = rng.standard_normal(int(outside.sum()))
        outside = np.abs(out) > bound
    return out * sigma


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _span(lo: float, hi: float, min_len: float, limit: float) -> tuple[float, float]:
    """[lo, hi] clipped to [0, limit] and at least ``min_len`` long (moved inward at an edge)."""
    lo, hi = max(0.0, lo), min(limit, hi)
    if hi - lo < min_len:
        centre = min(max((lo + hi) / 2, min_len / 2), limit - min_len / 2)
        lo, hi = max(0.0, centre - min_len / 2), min(limit, centre + min_len / 2)
    return lo, hi


def perturb_box(box: Sequence[float], rng: np.random.Generator, geometry: Geometry, config: GRBPConfig,
                integer: bool = True, stats: GRBPStats | None = None) -> Box:
    """One GRBP draw for one box (in the policy's frame). Returns the original box when the guard rejects every try,
    or when the box is degenerate (zero width or height)."""
    stats = stats if stats is not None else GRBPStats()
    stats.boxes += 1
    x1, y1, x2, y2 = (float(v) for v in box)
    w, h = x2 - x1, y2 - y1
    original: Box = (x1, y1, x2, y2)
    if w <= 0 or h <= 0 or not geometry.valid:
        stats.kept_original += 1
        return original
    sx, sy = geometry.px_per_unit_x, geometry.px_per_unit_y
    small = (w * sx) * (h * sy) < config.small_side ** 2
    factor = config.small_factor if small else 1.0
    stats.small += int(small)
    sigma_c = factor * config.beta / math.sqrt(3)
    sigma_s = factor * config.gamma / math.sqrt(3)
    lo, hi = config.scale_clamp
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    for _ in range(config.tries):
        stats.draws += 1
        dx, dy = truncated_normal(rng, sigma_c, config.truncate, 2)
        dw, dh = truncated_normal(rng, sigma_s, config.truncate, 2)
        new_w = w * min(max(1.0 + dw, lo), hi)
        new_h = h * min(max(1.0 + dh, lo), hi)
        ncx, ncy = cx + dx * w, cy + dy * h
        nx1, nx2 = _span(ncx - new_w / 2, ncx + new_w / 2, config.min_size / sx, geometry.extent_w)
        ny1, ny2 = _span(ncy - new_h / 2, ncy + new_h / 2, config.min_size / sy, geometry.extent_h)
        candidate: Box = (nx1, ny1, nx2, ny2)
        if integer:
            candidate = tuple(float(round(v)) for v in candidate)  # type: ignore[assignment]
        if candidate[2] > candidate[0] and candidate[3] > candidate[1] and iou(candidate, original) >= config.tau:
            stats.perturbed += 1
            return candidate
    stats.kept_original += 1
    return original


def perturb_turn(turn: str, rng: np.random.Generator, geometry: Geometry, config: GRBPConfig,
                 stats: GRBPStats | None = None) -> str:
    """An assistant turn with every box of its (last) ``<answer>`` block perturbed, and the same replacement made
    for identical box literals in the rest of the turn (see the module docstring). A turn without an answer block, or
    without a usable geometry, comes back unchanged."""
    stats = stats if stats is not None else GRBPStats()
    if not config.enabled or not geometry.valid:
        return turn
    blocks = list(_ANSWER_BLOCK.finditer(turn))
    if not blocks:
        return turn
    block = blocks[-1]
    replaced: dict[Box, Box] = {}

    def answer_box(box: Box) -> Box:
        if box not in replaced:  # the same box written twice (one entity, two mentions) moves once
            replaced[box] = perturb_box(box, rng, geometry, config, stats=stats)
        return replaced[box]

    answer = map_box_literals(block.group(2), answer_box)
    before = map_box_literals(turn[:block.start()], lambda b: replaced.get(b))
    after = map_box_literals(turn[block.end():], lambda b: replaced.get(b))
    return before + block.group(1) + answer + block.group(3) + after
