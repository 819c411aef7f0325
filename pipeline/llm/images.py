"""Images as OpenAI ``image_url`` content parts: resized per config, encoded as base64 data URLs.

The data URL is a deterministic function of the image and the ``ImageConfig``, so the cache key (which hashes the URL)
is a content hash of exactly what the model saw.
"""

from __future__ import annotations

import base64
import hashlib
import io
from pathlib import Path
from typing import Any, Union

from PIL import Image

from .config import ImageConfig

ImageInput = Union[str, Path, bytes, Image.Image]

_MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}


def load_image(image: ImageInput) -> Image.Image:
    """A PIL image from a path, raw bytes or an image; raises ``ValueError`` naming the file when it cannot be read."""
    if isinstance(image, Image.Image):
        return image
    try:
        if isinstance(image, bytes):
            img = Image.open(io.BytesIO(image))
        else:
            img = Image.open(Path(image))
        img.load()
        return img
    except FileNotFoundError:
        raise ValueError(f"image not found: {image}") from None
    except (OSError, Image.DecompressionBombError) as exc:
        where = "<bytes>" if isinstance(image, bytes) else str(image)
        raise ValueError(f"cannot read image {where}: {exc}") from None


def resize_to_fit(img: Image.Image, max_side: int) -> Image.Image:
    """Shrink (never enlarge) so that the longest side is at most ``max_side``, keeping the aspect ratio."""
    w, h = img.size
    scale = max_side / max(w, h)
    if scale >= 1:
        return img
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)


def encode_image(image: ImageInput, config: ImageConfig | None = None) -> str:
    """``data:<mime>;base64,...`` of the image, resized and re-encoded per ``config``."""
    config = config or ImageConfig()
    img = resize_to_fit(load_image(image), config.max_side)
    if config.format == "JPEG" and img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    buf = io.BytesIO()
    save_kwargs: dict[str, Any] = {"quality": config.quality} if config.format in ("JPEG", "WEBP") else {}
    img.save(buf, format=config.format, **save_kwargs)
    return f"data:{_MIME[config.format]};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def image_part(image: ImageInput, config: ImageConfig | None = None) -> dict[str, Any]:
    """An OpenAI chat content part: ``{"type": "image_url", "image_url": {"url": "data:..."}}``."""
    return {"type": "image_url", "image_url": {"url": encode_image(image, config)}}


def image_hash(data_url: str) -> str:
    """sha256 of a data URL (what the cache key uses for an image)."""
    return hashlib.sha256(data_url.encode()).hexdigest()


def user_message(text: str, images: list[ImageInput] = (), config: ImageConfig | None = None) -> dict[str, Any]:
    """A user message with the images first, then the text (the order VLM chat templates expect)."""
    if not images:
        return {"role": "user", "content": text}
    parts = [image_part(img, config) for img in images]
    parts.append({"type": "text", "text": text})
    return {"role": "user", "content": parts}
