"""Image metadata for records: sha256, width, height, read once at ingest. Errors are returned, not raised."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


def find_image(image_dir: str | Path, key: str) -> Path | None:
    """``<image_dir>/<key>.<ext>`` for the usual extensions (Twitter images are .jpg), or None."""
    base = Path(os.path.abspath(image_dir))  # records carry the path to actors on other nodes: never relative
    for ext in IMAGE_EXTENSIONS:
        path = base / f"{key}{ext}"
        if path.is_file():
            return path
    return None


def image_info(path: str | Path, uri: str | None = None) -> tuple[dict[str, Any], str | None]:
    """(image struct, error). The struct always carries path/uri; sha256/size only when the file could be read."""
    path = Path(path)
    info: dict[str, Any] = {"path": str(path), "uri": uri or str(path), "sha256": None, "width": None, "height": None}
    try:
        data = path.read_bytes()
    except OSError as exc:
        return info, f"image {path}: cannot read ({exc.strerror or exc})"
    info["sha256"] = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(path) as im:
            im.verify()  # catches truncated / corrupt files without decoding the whole image
        with Image.open(path) as im:
            info["width"], info["height"] = im.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return info, f"image {path}: not a readable image ({exc})"
    return info, None
