"""The bundled sample: ten tweets in Twitter-GMNER layout whose photos ship inside scikit-image and matplotlib.

The annotations live in ``gmner_pipeline/sample/`` (``txt/train.txt``, ``xml/<IMGID>.xml``, ``photos.yaml``); the
photos are not copied into the repository but materialised from the installed packages into
``<cache_dir>/sample-images/<IMGID>.png`` the first time they are needed. Nothing is downloaded: only images that ship
inside the wheels are used, so ``gmner-pipeline run synthesize`` works offline on a fresh machine.
"""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import yaml
from PIL import Image

from ..atomic import write_bytes_atomic
from .twitter_gmner import read_twitter_gmner

log = logging.getLogger(__name__)

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "sample"  # gmner_pipeline/sample (pipeline/sample in the repo)
IMAGE_SUBDIR = "sample-images"
SPLIT = "train"
# Bump when the rendering of a photo changes (colour handling, ...): caches made by an older version are redrawn.
RENDER_VERSION = 2
STAMP_FILE = ".render-version"


def sample_photos() -> dict[str, str]:
    """IMGID -> loader spec (``skimage:<function>`` or ``matplotlib:<file>``), from photos.yaml."""
    table = yaml.safe_load((SAMPLE_DIR / "photos.yaml").read_text(encoding="utf-8"))
    return {imgid: table["photos"][photo] for imgid, photo in table["images"].items()}


def load_photo(spec: str) -> Image.Image:
    """An RGB image from a package that ships it. Raises with a message naming the package when it is missing."""
    package, _, name = spec.partition(":")
    if package == "skimage":
        try:
            import skimage.data
        except ImportError as exc:
            raise RuntimeError("the sample's photos need scikit-image: pip install scikit-image") from exc
        array = np.asarray(getattr(skimage.data, name)())
        if array.dtype == bool:  # the horse is a binary mask (False = horse): draw it black on white
            array = np.where(array, 255, 0).astype(np.uint8)
        return Image.fromarray(array).convert("RGB")
    if package == "matplotlib":
        try:
            from matplotlib import cbook
        except ImportError as exc:
            raise RuntimeError("the sample's photos need matplotlib: pip install matplotlib") from exc
        with Image.open(cbook.get_sample_data(name, asfileobj=False)) as im:
            return im.convert("RGB")
    raise ValueError(f"unknown photo source {spec!r} in {SAMPLE_DIR / 'photos.yaml'}")


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # 3x faster than the default, files ~10% larger
    return buf.getvalue()




def render_stamp() -> str:
    """Identifies how the images are drawn: the rendering version plus the photo table."""
    digest = hashlib.sha256((SAMPLE_DIR / "photos.yaml").read_bytes()).hexdigest()[:16]
    return f"{RENDER_VERSION}:{digest}"


def materialise_images(cache_dir: str | Path) -> Path:
    """Make ``<cache_dir>/sample-images/<IMGID>.png`` for every sample image. Existing files are kept unless they
    were drawn by another rendering version (see ``render_stamp``). A photo that cannot be produced is logged; the
    records that need it then carry an "image not found" error."""
    image_dir = Path(cache_dir) / IMAGE_SUBDIR
    image_dir.mkdir(parents=True, exist_ok=True)
    stamp_path = image_dir / STAMP_FILE
    stamp = render_stamp()
    stale = not stamp_path.is_file() or stamp_path.read_text(encoding="utf-8").strip() != stamp
    encoded: dict[str, bytes] = {}  # photo spec -> PNG bytes, so a photo shared by two tweets is encoded once
    failed = False
    for imgid, spec in sample_photos().items():
        path = image_dir / f"{imgid}.png"
        if path.is_file() and not stale:
            continue
        try:
            if spec not in encoded:
                encoded[spec] = png_bytes(load_photo(spec))
            write_bytes_atomic(path, encoded[spec])
        except Exception as exc:  # noqa: BLE001 - reported per image, the other records still ingest
            failed = True
            log.warning("sample image %s (%s) could not be materialised: %s", imgid, spec, exc)
    if stale and not failed:
        write_bytes_atomic(stamp_path, stamp.encode())
    return image_dir


def read_sample(cache_dir: str | Path, source: str = "gmner-sample", limit: int | None = None
                ) -> Iterator[dict[str, Any]]:
    """Records of the bundled sample, with images materialised under ``cache_dir``."""
    image_dir = materialise_images(cache_dir)
    yield from read_twitter_gmner(SAMPLE_DIR, SPLIT, source=source, image_dir=image_dir, limit=limit)
