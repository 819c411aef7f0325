"""The annotate stage: top-K RTMDet boxes with class names per image (method-spec Stage 2, VKEL §III-D-3)."""

from __future__ import annotations

import logging
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np

from gmner_pipeline.schema import ERROR_TRANSIENT
from gmner_pipeline.stage import Record, Stage, StageSetupError, error_kind_of, mark_error

from .backends import DetectorBackend, backend_class
from .boxes import COCO_CLASSES, MalformedDetection, RawDetection, annotation_text, select_top_k, to_schema_boxes
from .config import AnnotateConfig
from .images import ImageLoadError, load_bgr

logger = logging.getLogger(__name__)


def build_detections(raw: Sequence[RawDetection], *, class_names: Sequence[str], width: int, height: int,
                     config: AnnotateConfig, model_id: str, backend: str) -> dict[str, Any]:
    """One image's backend output -> the record's ``detections`` column group."""
    boxes = to_schema_boxes(select_top_k(raw, config.top_k, config.score_threshold), class_names, width, height)
    normalise_to = (width, height) if config.annotation_coordinates == "normalized" else None
    return {"model_id": model_id, "backend": backend, "boxes": boxes,
            "annotation_text": annotation_text(boxes, normalise_to=normalise_to)}


def _load_or_error(path: str) -> np.ndarray | ImageLoadError:
    """Decode one image (each image is decoded exactly once); runs in a worker thread, so it returns the error."""
    try:
        return load_bgr(path)
    except ImageLoadError as exc:
        return exc


class AnnotateStage(Stage):
    name = "annotate"
    version = "1"
    Config = AnnotateConfig
    reads = frozenset({"image"})
    writes = frozenset({"detections"})

    config: AnnotateConfig
    backend: DetectorBackend | None = None

    @classmethod
    def preflight(cls, config: AnnotateConfig) -> None:
        try:
            backend = backend_class(config.detector.backend)
        except ImportError as exc:
            raise StageSetupError(f"the {config.detector.backend} backend cannot be imported ({exc}): "
                                  'install the detect extra: pip install "gmner-pipeline[detect]"') from exc
        backend.preflight(config.detector)

    def setup(self) -> None:
        self.attach(backend_class(self.config.detector.backend)(self.config.detector))

    def attach(self, backend: DetectorBackend) -> None:
        """Use this detector (``setup`` builds it from the config; tests and benchmarks inject theirs)."""
        self.backend = backend
        self.class_names: Sequence[str] = self.config.class_names or backend.class_names or COCO_CLASSES
        self.model_ids = [backend.model_id]
        self.stats: Counter[str] = Counter()

    def close(self) -> None:
        if self.backend is None:
            return
        if self.stats:
            logger.info("annotate: %s", ", ".join(f"{k}={v}" for k, v in sorted(self.stats.items())))
        self.backend.close()
        self.backend = None

    def process(self, records: list[Record]) -> list[Record]:
        todo = [r for r in records if self._has_image_path(r)]
        size = self.config.inference_batch_size
        chunks = [todo[start:start + size] for start in range(0, len(todo), size)]
        # Decode the next batch in threads while the detector runs on this one (PIL and the engines release the
        # GIL), so that image decoding hides behind inference instead of adding to it.
        with ThreadPoolExecutor(max_workers=self.config.decode_workers) as pool:
            pending = self._decode(pool, chunks[0]) if chunks else None
            for k in range(len(chunks)):
                decoded = [(record, self._image_or_error(record, future.result())) for record, future in pending]
                pending = self._decode(pool, chunks[k + 1]) if k + 1 < len(chunks) else None
                self._annotate_batch([(r, image) for r, image in decoded if image is not None])
        return records

    def _has_image_path(self, record: Record) -> bool:
        if (record.get("image") or {}).get("path"):
            return True
        self.stats["error_no_image"] += 1
        mark_error(record, self.name, "record has no image path (image.path is empty): annotate needs an image; run "
                   "retrieve first for text-only sources")
        return False

    @staticmethod
    def _decode(pool: ThreadPoolExecutor, chunk: list[Record]) -> list[tuple[Record, Future]]:
        return [(record, pool.submit(_load_or_error, record["image"]["path"])) for record in chunk]

    def _image_or_error(self, record: Record, result: np.ndarray | ImageLoadError) -> np.ndarray | None:
        """In the calling thread: a decoding failure goes on the record and into the stats."""
        if isinstance(result, ImageLoadError):
            self.stats["error_image"] += 1
            mark_error(record, self.name, str(result))
            return None
        return result

    def _annotate_batch(self, batch: list[tuple[Record, np.ndarray]]) -> None:
        images = [image for _, image in batch]
        try:
            outputs: list[list[RawDetection] | Exception] = list(self.backend.detect(images))
            if len(outputs) != len(images):
                raise ValueError(f"detector returned {len(outputs)} results for {len(images)} images")
        except Exception as exc:  # noqa: BLE001 - isolate the image that broke the batch, keep the rest
            logger.warning("detector failed on a batch of %d (%s); retrying image by image", len(images), exc)
            outputs = [self._detect_one(image) for image in images]
        for (record, image), output in zip(batch, outputs, strict=True):
            if isinstance(output, Exception):
                self.stats["error_model"] += 1
                mark_error(record, self.name, f"detector failed on {record['image']['path']}: {output}",
                           transient=error_kind_of(output) == ERROR_TRANSIENT)  # e.g. out of GPU memory
                continue
            height, width = image.shape[:2]
            try:
                record["detections"] = build_detections(
                    output, class_names=self.class_names, width=width, height=height, config=self.config,
                    model_id=self.backend.model_id, backend=self.backend.name)
            except MalformedDetection as exc:
                self.stats["error_model_output"] += 1
                mark_error(record, self.name, f"{record['image']['path']}: {exc}")
                continue
            image_info = record["image"]
            if image_info.get("width") is None or image_info.get("height") is None:
                image_info["width"], image_info["height"] = width, height
            self.stats["annotated"] += 1
            self.stats["boxes"] += len(record["detections"]["boxes"])

    def _detect_one(self, image: np.ndarray) -> list[RawDetection] | Exception:
        try:
            return self.backend.detect([image])[0]
        except Exception as exc:  # noqa: BLE001
            return exc
