"""Per-style keys and the style store: a new teacher for one style re-requests nothing for the other styles.

The stage's output folder is keyed by everything (every style's teacher, prompts, sampling), so changing one teacher
gives a new ``distill/<key>/`` folder and recomputes the stage and what follows, leaving the old folder in place. Each
teacher style also has its own **style key**: a hash of what decides that style's chains and nothing else (the
stage version, the style's section, the gold check, the variation settings and seeds, the teacher's model identity,
sampling, n handling and frame, the prompt files' hash, and for mllm how images are encoded). A chain records its
style key (``COT_CHAIN.style_key``), which is also how ``gmner-pipeline teachers`` tells teacher versions apart.

When a style finished a record without a transient failure, its chains are stored under ``(style key, record id,
fingerprint of the record's inputs to that style)`` in the same persistent store as the LLM request cache
(``llm.cache``: sqlite on one machine, files on shared storage). The next run, in whatever stage folder, takes them
from there when the style key and the inputs are unchanged: no prompt is built, no image encoded, nothing sent. The
request cache alone would also send nothing (every request and re-ask of an unchanged style is answered from it), but
it still rebuilds every prompt and re-encodes every image to look the answers up.

The fingerprint covers exactly what the style's prompt builders read: ``teacher_view`` extracts those fields and the
builders get the view, never the record.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from gmner_pipeline.hashing import stable_hash
from gmner_pipeline.llm.cache import RequestCache

log = logging.getLogger(__name__)

STORE_VERSION = 1  # bump when the meaning of a stored entry changes


def style_key(payload: dict[str, Any]) -> str:
    """The key of a style's chains (see the module docstring for what ``payload`` holds)."""
    return stable_hash({"store": STORE_VERSION, **payload}, length=16)


def teacher_view(record: dict[str, Any], *, knowledge: bool, detections: bool) -> dict[str, Any]:
    """The fields of a record a teacher style reads (its prompt and its gold check): the sample, the image reference,
    and the hints the style uses. The style store's fingerprint is a hash of exactly this."""
    img = record.get("image") or {}
    view: dict[str, Any] = {k: record.get(k) for k in ("id", "split", "text", "tokens", "entities",
                                                       "grounding_labels")}
    view["image"] = {k: img.get(k) for k in ("path", "sha256", "width", "height")}
    if knowledge:
        view["knowledge"] = [{k: item.get(k) for k in ("entity", "type", "fine_type", "knowledge")}
                             for item in record.get("knowledge") or []]
    if detections and record.get("detections"):
        det = record["detections"]
        view["detections"] = {"boxes": [{k: b.get(k) for k in ("label", "score", "box")}
                                        for b in det.get("boxes") or []]}
    return view


def fingerprint(view: dict[str, Any]) -> str:
    return stable_hash(view, length=32)


class StyleStore:
    """Stored chains of one record and style; a broken store costs a recomputation, never the record."""

    def __init__(self, cache: RequestCache | None):
        self.cache = cache

    @staticmethod
    def key(style_key_: str, record_id: str, print_: str) -> str:
        blob = json.dumps(["distill-style", STORE_VERSION, style_key_, record_id, print_])
        return hashlib.sha256(blob.encode()).hexdigest()

    def get(self, key: str) -> dict[str, Any] | None:
        if self.cache is None:
            return None
        try:
            value = self.cache.get(key)
        except Exception as exc:  # noqa: BLE001
            log.warning("distill style store lookup failed (%s); recomputing", exc)
            return None
        return value if isinstance(value, dict) and isinstance(value.get("chains"), list) else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        if self.cache is None:
            return
        try:
            self.cache.put(key, value)
        except Exception as exc:  # noqa: BLE001
            log.warning("distill style store write failed (%s); the chains are kept, not stored", exc)

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
