"""Image bytes -> checked RGB image: magic-byte sniffing, a pixel limit checked before decoding, content addressing.

Everything here is pure (bytes in, values out) so the checks are the same for corpus files, Parquet/WebDataset rows and
downloads.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from gmner_pipeline.atomic import write_bytes_atomic

# The formats we accept, by the bytes a file of that format starts with. PIL is told to try only the sniffed format, so
# a file cannot reach a decoder for a format we never meant to parse.
_MAGIC: list[tuple[bytes, int, str]] = [  # (signature, offset, PIL format)
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"BM", 0, "BMP"),
]
_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "BMP": "bmp", "WEBP": "webp"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
ACCEPTED_CONTENT_TYPES = ("image/jpeg", "image/jpg", "image/pjpeg", "image/png", "image/gif", "image/bmp",
                          "image/x-ms-bmp", "image/webp")


class UnreadableImage(ValueError):
    """The bytes are not an image we accept (unknown format, truncated, too many pixels)."""


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int

    @property
    def extension(self) -> str:
        return _EXTENSIONS[self.format]


def sniff_format(data: bytes) -> str | None:
    """The image format named by the leading bytes, or None when they match no accepted format."""
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for signature, offset, fmt in _MAGIC:
        if data[offset:offset + len(signature)] == signature:
            return fmt
    return None


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def open_checked(data: bytes, max_pixels: int) -> tuple[Image.Image, ImageInfo]:
    """Open ``data`` lazily, check format and size from the header only, then decode. Raises ``UnreadableImage``."""
    fmt = sniff_format(data)
    if fmt is None:
        raise UnreadableImage(f"not a JPEG/PNG/GIF/BMP/WebP file (starts with {data[:8]!r})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[fmt])
            width, height = img.size  # from the header: nothing decoded yet
            if width <= 0 or height <= 0:
                raise UnreadableImage(f"{fmt} with empty size {width}x{height}")
            if width * height > max_pixels:
                raise UnreadableImage(
                    f"{fmt} of {width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels} "
                    "(decompression bomb guard; raise download.max_pixels to accept it)"
                )
            img.load()
    except UnreadableImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UnreadableImage(f"decompression bomb: {exc}") from None
    except Exception as exc:  # PIL raises many types for corrupt data (OSError, SyntaxError, ValueError, ...)
        raise UnreadableImage(f"cannot decode {fmt}: {exc}") from None
    return img, ImageInfo(fmt, width, height)


def to_rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")


def probe(data: bytes, max_pixels: int) -> ImageInfo:
    """Validate ``data`` fully (decode included) and return its format and size."""
    img, info = open_checked(data, max_pixels)
    img.close()
    return info


def store_content_addressed(data: bytes, store_dir: str | Path, extension: str, digest: str | None = None) -> Path:
    """Write ``data`` to ``<store>/<sha[:2]>/<sha>.<ext>`` once (atomic rename; an existing file is reused)."""
    digest = digest or sha256_hex(data)
    target = Path(store_dir) / digest[:2] / f"{digest}.{extension}"
    if target.is_file():
        return target
    write_bytes_atomic(target, data)
    return target
