"""Text-only CoNLL BIO NER files -> records without images, for the retrieve stage to pair with images.

Source labels are mapped to the target coarse types by a config table (``label_map``), e.g. WNUT's ``person`` ->
``PER`` or Few-NERD's ``building-hotel`` -> ``building``. A label the table maps to ``""`` is dropped on purpose; a
label the table does not mention is dropped too, unless ``strict_labels`` is set, which makes it an error.
Grounding is marked ``absent``: such samples have no boxes, which must never be read as "not visible".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping

from ..schema import ERROR_PERMANENT, GROUNDING_ABSENT, STATUS_ERROR, empty_record
from .conll import DEFAULT_MAX_LINE_BYTES, bio_spans, read_conll_blocks
from .twitter_gmner import make_id


def map_label(label: str, label_map: Mapping[str, str]) -> str | None:
    """Exact match first, then the longest mapped prefix on ``-`` boundaries (``person-actor`` -> ``person``)."""
    if label in label_map:
        return label_map[label]
    parts = label.split("-")
    for k in range(len(parts) - 1, 0, -1):
        prefix = "-".join(parts[:k])
        if prefix in label_map:
            return label_map[prefix]
    return None


def read_text_conll(path: str | Path, *, label_map: Mapping[str, str], source: str = "conll", split: str = "train",
                    strict_labels: bool = False, limit: int | None = None,
                    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> Iterator[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CoNLL file {path} not found")
    for n, block in enumerate(read_conll_blocks(path, max_line_bytes=max_line_bytes)):
        if limit is not None and n >= limit:
            return
        where = f"{block.path}:{block.line}: "
        spans, errors = bio_spans(block.labels, block.path, block.lines)
        errors = list(block.errors) + errors
        entities = []
        for span in spans:
            target = map_label(span.label, label_map) if label_map else span.label
            if target is None and strict_labels:
                errors.append(f"{where}label {span.label!r} is not in label_map; add it (or map it to '' to drop)")
            if not target:
                continue
            entities.append({"text": " ".join(block.tokens[span.start:span.end]), "start": span.start,
                             "end": span.end, "type": target, "fine_type": span.label, "boxes": []})
        key = f"{block.line}"
        record = empty_record(
            id=make_id(source, split, key), source=source, split=split, sample_key=key,
            text=" ".join(block.tokens), tokens=block.tokens, image=None, grounding_labels=GROUNDING_ABSENT,
            entities=entities,
        )
        if errors:
            record.update(status=STATUS_ERROR, error="; ".join(errors), error_stage="ingest",
                          error_kind=ERROR_PERMANENT)
        yield record
