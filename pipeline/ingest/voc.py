"""Pascal-VOC annotation files (Twitter-GMNER's xml/<id>.xml), read with line numbers for clear error messages."""

from __future__ import annotations

import math
import os
import xml.parsers.expat
from dataclasses import dataclass, field
from pathlib import Path

# JPEG's limit on a side; a box or a <size> beyond it is a typo or garbage, never a real tweet image.
MAX_IMAGE_SIDE = 65535
# Twitter-GMNER's XML files are about 1 KB; a file this large is not an annotation (and would be parsed whole).
DEFAULT_MAX_XML_BYTES = 1024 * 1024


@dataclass
class VocObject:
    name: str
    box: tuple[float, float, float, float]  # xmin, ymin, xmax, ymax
    line: int


@dataclass
class VocAnnotation:
    path: str
    width: int | None = None
    height: int | None = None
    objects: list[VocObject] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def read_voc(path: str | Path, max_bytes: int = DEFAULT_MAX_XML_BYTES) -> VocAnnotation:
    """Parse one VOC file. Never raises: problems are listed in ``errors`` as ``file:line: what``."""
    path = str(path)
    ann = VocAnnotation(path)
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        ann.errors.append(f"{path}: cannot read ({exc.strerror or exc})")
        return ann
    if size > max_bytes:
        ann.errors.append(f"{path}: {size} bytes, more than source.max_xml_bytes={max_bytes}; not a VOC annotation?")
        return ann
    parser = xml.parsers.expat.ParserCreate()
    stack: list[str] = []
    text: list[str] = []
    obj: dict = {}

    def start(tag: str, _attrs: dict) -> None:
        stack.append(tag)
        text.clear()
        if tag == "object":
            obj.clear()
            obj["line"] = parser.CurrentLineNumber

    def end(tag: str) -> None:
        value = "".join(text).strip()
        parent = stack[-2] if len(stack) > 1 else ""
        if parent == "size" and tag in {"width", "height"}:
            try:
                side = float(value)
            except ValueError:
                ann.errors.append(f"{path}:{parser.CurrentLineNumber}: <{tag}> is not a number: {value!r}")
            else:
                if math.isfinite(side) and 0 < side <= MAX_IMAGE_SIDE:
                    setattr(ann, tag, int(side))
                else:
                    ann.errors.append(f"{path}:{parser.CurrentLineNumber}: <{tag}> {value} is not an image side "
                                      f"(1..{MAX_IMAGE_SIDE} px)")
        elif parent == "object" and tag == "name":
            obj["name"] = value
        elif parent == "bndbox" and tag in {"xmin", "ymin", "xmax", "ymax"}:
            try:
                obj[tag] = float(value)
            except ValueError:
                ann.errors.append(f"{path}:{parser.CurrentLineNumber}: <{tag}> is not a number: {value!r}")
        elif tag == "object":
            missing = [k for k in ("name", "xmin", "ymin", "xmax", "ymax") if k not in obj]
            if missing:
                ann.errors.append(f"{path}:{obj['line']}: <object> lacks {', '.join(missing)}")
            else:
                box = (obj["xmin"], obj["ymin"], obj["xmax"], obj["ymax"])
                ann.objects.append(VocObject(obj["name"], box, obj["line"]))
        stack.pop()
        text.clear()

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = text.append
    try:
        with open(path, "rb") as fh:
            parser.ParseFile(fh)
    except OSError as exc:
        ann.errors.append(f"{path}: cannot read ({exc.strerror or exc})")
    except xml.parsers.expat.ExpatError as exc:
        ann.errors.append(f"{path}:{exc.lineno}: not well-formed XML ({xml.parsers.expat.ErrorString(exc.code)})")
    return ann


def box_problem(box: tuple[float, float, float, float], width: int | None, height: int | None,
                tolerance: float = 1.0) -> str | None:
    """Why a box is unusable, or None. Checked whether or not the image size is known: every coordinate finite and
    not below ``-tolerance``, the box not empty or inverted, and inside the image (by ``tolerance`` px) when its size
    is known, else inside the largest image there can be (``MAX_IMAGE_SIDE``)."""
    x1, y1, x2, y2 = box
    if not all(math.isfinite(v) for v in box):
        return f"box {list(box)} has a coordinate that is not a finite number"
    if not (x2 > x1 and y2 > y1):
        return f"box {list(box)} is empty or inverted"
    if min(x1, y1) < -tolerance:
        return f"box {list(box)} has a negative coordinate"
    if width is not None and height is not None:
        if x2 > width + tolerance or y2 > height + tolerance:
            return f"box {list(box)} lies outside the {width}x{height} image"
    elif max(x2, y2) > MAX_IMAGE_SIDE + tolerance:
        return f"box {list(box)} is larger than any image ({MAX_IMAGE_SIDE} px a side)"
    return None
