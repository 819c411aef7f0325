"""Model coordinate frames: the one place that converts boxes between original-image pixels and a model's frame.

Shards store every box in pixels of the ORIGINAL image. A model that sees the image sees a resized copy and answers in
its own frame (method-spec §Model coordinate frames), so every prompt that shows a box to a model and every answer
read back from one goes through ``to_frame`` / ``from_frame`` here, with the frame taken from the role's config:

* ``original``: pixels of the original image (text-only models, detectors, most APIs).
* ``qwen2_5_vl``: absolute pixels of the ``smart_resize``d image Qwen2.5-VL sees: both sides rounded to multiples of
  ``factor`` (28), the area clamped to [``min_pixels``, ``max_pixels``]. E2E-GMNER trained with 256·28·28 and
  1024·28·28, our defaults. Send the image already resized to ``model_image_size`` (``prepare_image``): the server's
  own smart_resize is then the identity, so the frame does not depend on the server's processor settings.
* ``qwen2_vl``: integers normalised to 0..1000 of the image's width and height (Qwen2-VL).
* ``normalized``: 0..``scale`` of the width and height (e.g. 1.0 for [0, 1] frames).

Boxes are mapped back to original pixels BEFORE any IoU is computed: IoU is not invariant to a non-uniform rescale.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Literal, Sequence

from pydantic import Field, model_validator

from .answer import format_box
from .configbase import Frozen

Box = tuple[float, float, float, float]
FrameKind = Literal["original", "qwen2_5_vl", "qwen2_vl", "normalized"]

# E2E-GMNER's Qwen2.5-VL setting (and the processor's patch * merge size)
QWEN_FACTOR = 28
QWEN_MIN_PIXELS = 256 * 28 * 28
QWEN_MAX_PIXELS = 1024 * 28 * 28
QWEN_MAX_ASPECT = 200  # the processor refuses images more elongated than this


class FrameError(ValueError):
    """An image or box that cannot be put into the frame (zero size, extreme aspect ratio)."""


class FrameConfig(Frozen):
    """The coordinate frame a model reads and writes boxes in (a property of the model's role)."""

    kind: FrameKind = Field("original", description="original | qwen2_5_vl | qwen2_vl | normalized")
    factor: int = Field(QWEN_FACTOR, ge=1, description="qwen2_5_vl: sides are multiples of this")
    min_pixels: int = Field(QWEN_MIN_PIXELS, ge=1, description="qwen2_5_vl: smallest image area the model sees")
    max_pixels: int = Field(QWEN_MAX_PIXELS, ge=1, description="qwen2_5_vl: largest image area the model sees")
    scale: float = Field(1000.0, gt=0, description="normalized: the value of the right/bottom edge "
                         "(qwen2_vl is fixed at 1000)")
    integer: bool = Field(True, description="round the model's coordinates to integers when writing them")

    @model_validator(mode="after")
    def _check(self) -> "FrameConfig":
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels {self.min_pixels} > max_pixels {self.max_pixels}")
        return self

    def describe(self) -> str:
        """One sentence for prompts: what the numbers of a box mean in this frame."""
        if self.kind == "qwen2_5_vl":
            return "Boxes are [x1,y1,x2,y2] in pixels of the image as you see it (top-left and bottom-right corners)."
        if self.kind in ("qwen2_vl", "normalized"):
            edge = 1000 if self.kind == "qwen2_vl" else _num(self.scale)
            return (f"Boxes are [x1,y1,x2,y2] with coordinates normalised to 0-{edge} of the image width and height "
                    "(top-left and bottom-right corners).")
        return "Boxes are [x1,y1,x2,y2] in pixels of the original image (top-left and bottom-right corners)."


ORIGINAL = FrameConfig()


def smart_resize(height: int, width: int, factor: int = QWEN_FACTOR, min_pixels: int = QWEN_MIN_PIXELS,
                 max_pixels: int = QWEN_MAX_PIXELS) -> tuple[int, int]:
    """(height, width) of the image Qwen2-VL / Qwen2.5-VL processors feed the model (their ``smart_resize`` rule):
    each side rounded to a multiple of ``factor``, then scaled (keeping the aspect ratio) into the pixel budget."""
    if height <= 0 or width <= 0:
        raise FrameError(f"image size {width}x{height} is empty")
    if max(height, width) / min(height, width) > QWEN_MAX_ASPECT:
        raise FrameError(f"image {width}x{height} has an aspect ratio above {QWEN_MAX_ASPECT}, which Qwen-VL refuses")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def model_image_size(frame: FrameConfig, width: int, height: int) -> tuple[int, int]:
    """(width, height) of the image to SEND a model of this frame (the original size except for qwen2_5_vl)."""
    if width <= 0 or height <= 0:
        raise FrameError(f"image size {width}x{height} is empty")
    if frame.kind == "qwen2_5_vl":
        h, w = smart_resize(height, width, frame.factor, frame.min_pixels, frame.max_pixels)
        return w, h
    return width, height


def frame_extent(frame: FrameConfig, width: int, height: int) -> tuple[float, float]:
    """The frame's coordinate of the image's right and bottom edges (what a box in the frame is clipped to)."""
    if frame.kind == "qwen2_5_vl":
        return tuple(float(v) for v in model_image_size(frame, width, height))  # type: ignore[return-value]
    if frame.kind == "qwen2_vl":
        return 1000.0, 1000.0
    if frame.kind == "normalized":
        return frame.scale, frame.scale
    return float(width), float(height)


def to_frame(box: Sequence[float], width: int, height: int, frame: FrameConfig = ORIGINAL) -> Box:
    """A box in original pixels -> the model's frame (rounded when ``frame.integer``)."""
    ex, ey = frame_extent(frame, width, height)
    sx, sy = ex / width, ey / height
    x1, y1, x2, y2 = (float(v) for v in box)
    out = (x1 * sx, y1 * sy, x2 * sx, y2 * sy)
    if frame.integer:
        out = tuple(float(round(v)) for v in out)  # type: ignore[assignment]
    return out  # type: ignore[return-value]


def from_frame(box: Sequence[float], width: int, height: int, frame: FrameConfig = ORIGINAL) -> Box:
    """A box the model wrote in its frame -> original pixels (not clipped: judging a box is the scorer's job)."""
    ex, ey = frame_extent(frame, width, height)
    sx, sy = width / ex, height / ey
    x1, y1, x2, y2 = (float(v) for v in box)
    return (x1 * sx, y1 * sy, x2 * sx, y2 * sy)


def boxes_to_frame(boxes: Sequence[Sequence[float]] | None, width: int, height: int,
                   frame: FrameConfig = ORIGINAL) -> tuple[Box, ...] | None:
    return None if boxes is None else tuple(to_frame(b, width, height, frame) for b in boxes)


def boxes_from_frame(boxes: Sequence[Sequence[float]] | None, width: int, height: int,
                     frame: FrameConfig = ORIGINAL) -> tuple[Box, ...] | None:
    return None if boxes is None else tuple(from_frame(b, width, height, frame) for b in boxes)


def prepare_image(image: "PIL.Image.Image", frame: FrameConfig) -> "PIL.Image.Image":  # noqa: F821
    """The image as the model of this frame should receive it: resized to ``model_image_size`` for qwen2_5_vl (so
    that the server's processor leaves it as it is), unchanged otherwise."""
    size = model_image_size(frame, *image.size)
    if size == image.size:
        return image
    from PIL import Image

    return image.resize(size, Image.Resampling.BICUBIC)


# A box literal as the answer format writes it: [x1,y1,x2,y2] with optional spaces. Unambiguous (every separator is a
# comma), so matching is linear in the text.
_BOX_LITERAL = re.compile(r"\[ ?(-?\d+(?:\.\d+)?) ?, ?(-?\d+(?:\.\d+)?) ?, ?(-?\d+(?:\.\d+)?) ?, ?(-?\d+(?:\.\d+)?) ?\]")


def map_box_literals(text: str, mapper: Callable[[Box], Box | None]) -> str:
    """Rewrite every ``[x1,y1,x2,y2]`` literal in a text (a reasoning chain, an answer) through ``mapper``, written
    back as integers; a literal for which ``mapper`` returns None stays exactly as written. Chains are stored in
    original pixels; this puts their boxes into (or out of) a model's frame."""

    def sub(m: re.Match) -> str:
        box = mapper(tuple(float(v) for v in m.groups()))  # type: ignore[arg-type]
        if box is None or not all(math.isfinite(v) for v in box):  # None, or a number too large for a float
            return m.group(0)  # (model output): left as written
        return format_box(box)

    return _BOX_LITERAL.sub(sub, text)


def text_to_frame(text: str, width: int, height: int, frame: FrameConfig = ORIGINAL) -> str:
    """Every box literal of a text from original pixels into the frame (the text unchanged for ``original``)."""
    if frame.kind == "original":
        return text
    return map_box_literals(text, lambda b: to_frame(b, width, height, frame))


def text_from_frame(text: str, width: int, height: int, frame: FrameConfig = ORIGINAL) -> str:
    """Every box literal of a text from the frame back into original pixels."""
    if frame.kind == "original":
        return text
    return map_box_literals(text, lambda b: from_frame(b, width, height, frame))


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)
