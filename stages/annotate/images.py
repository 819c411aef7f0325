"""Decoding an image file once into the array every backend takes (uint8 BGR, H x W x 3, EXIF orientation applied)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


_EXIF_ORIENTATION = 0x0112


class ImageLoadError(ValueError):
    """The image cannot be used; the message names the file and the reason."""


def load_bgr(path: str | Path) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            # Only photos with an EXIF rotation need transposing (exif_transpose would copy every image).
            if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
                img = ImageOps.exif_transpose(img)
            rgb = img if img.mode == "RGB" else img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageLoadError(f"cannot decode image {path}: {exc}") from exc
    array = np.asarray(rgb)
    if array.ndim != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageLoadError(f"image {path} has no pixels (shape {array.shape})")
    return np.ascontiguousarray(array[..., ::-1])
