"""Thumbnails beside the view page: one JPEG per image (its longer side at most ``THUMB`` pixels), named by the
source file's path, size and modification time, so a second ``view`` of the same run writes nothing new."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from PIL import Image

THUMB = 480  # the page shows images 420 px wide


def thumb_name(path: Path) -> str:
    st = path.stat()
    key = f"{path.resolve()}\x1f{st.st_size}\x1f{st.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:20] + ".jpg"


def write_thumb(record: dict[str, Any], folder: Path) -> str | None:
    """The thumbnail's file name under ``folder`` (written when absent), or None without a readable image."""
    src = (record.get("image") or {}).get("path")
    if not src:
        return None
    path = Path(src)
    try:
        name = thumb_name(path)
        target = folder / name
        if not target.is_file():
            with Image.open(path) as im:
                im = im.convert("RGB")
                im.thumbnail((THUMB, THUMB))
                folder.mkdir(parents=True, exist_ok=True)
                tmp = target.with_suffix(".tmp")
                im.save(tmp, format="JPEG", quality=80)
                tmp.replace(target)
        return name
    except OSError:  # missing or unreadable: the page draws the boxes on an empty frame of the image's size
        return None
