"""Twitter-GMNER layout -> records.

``<root>/txt/<split>.txt``: CoNLL, each tweet opened by ``IMGID:<id>``; ``<root>/xml/<id>.xml``: Pascal-VOC, one
``<object>`` per box whose ``<name>`` is the entity's surface text (tokens joined by one space). An entity whose text
matches no object is ungroundable (not visible); when several entities share a text, each gets all of its boxes (this
reproduces the dataset's published counts). Images are optional: without them width/height come from the XML.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

from ..schema import ERROR_PERMANENT, GROUNDING_PRESENT, STATUS_ERROR, empty_record
from .conll import DEFAULT_MAX_LINE_BYTES, bio_spans, read_conll_blocks
from .images import find_image, image_info
from .voc import DEFAULT_MAX_XML_BYTES, box_problem, read_voc

HEADER = "IMGID:"


def make_id(source: str, split: str, key: str) -> str:
    """Stable, readable record id: ``<source>/<split>/<key>``."""
    return f"{source}/{split}/{key}"


def read_twitter_gmner(root: str | Path, split: str, *, source: str = "twitter-gmner-v2",
                       image_dir: str | Path | None = None, limit: int | None = None,
                       max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, max_xml_bytes: int = DEFAULT_MAX_XML_BYTES
                       ) -> Iterator[dict[str, Any]]:
    root = Path(root)
    txt = split_file(root, split)
    if not txt.is_file():
        raise FileNotFoundError(f"{txt} not found: expected the Twitter-GMNER layout <root>/txt/{{split}}.txt")
    seen: dict[str, int] = defaultdict(int)
    for n, block in enumerate(read_conll_blocks(txt, header_prefix=HEADER, max_line_bytes=max_line_bytes)):
        if limit is not None and n >= limit:
            return
        key = (block.header or "")[len(HEADER):].strip() or f"line{block.line}"
        seen[key] += 1
        record_key = key if seen[key] == 1 else f"{key}#{seen[key]}"  # a repeated IMGID stays a distinct record
        yield tweet_record(block, key, record_key, split, source, root, image_dir, max_xml_bytes)


def split_file(root: str | Path, split: str) -> Path:
    return Path(root) / "txt" / f"{split}.txt"


def tweet_record(block, image_key: str, record_key: str, split: str, source: str, root: Path,
                 image_dir: str | Path | None, max_xml_bytes: int = DEFAULT_MAX_XML_BYTES) -> dict[str, Any]:
    errors = list(block.errors)
    spans, bio_errors = bio_spans(block.labels, block.path, block.lines)
    errors += bio_errors
    tokens = block.tokens
    entities = [
        {"text": " ".join(tokens[s.start:s.end]), "start": s.start, "end": s.end, "type": s.label,
         "fine_type": None, "boxes": []}
        for s in spans
    ]

    # The image first: when the XML has no <size>, the boxes are checked against the image's own size.
    image = {"path": None, "uri": f"{source}:{image_key}", "sha256": None, "width": None, "height": None}
    image_path = None
    if image_dir is not None:
        image_path = find_image(image_dir, image_key)
        if image_path is None:
            errors.append(f"image for IMGID:{image_key} not found in {image_dir} (expected {image_key}.jpg)")
        else:
            image, err = image_info(image_path, uri=f"{source}:{image_key}")
            if err:
                errors.append(err)

    xml_path = root / "xml" / f"{image_key}.xml"
    if xml_path.is_file():
        ann = read_voc(xml_path, max_bytes=max_xml_bytes)
        errors += ann.errors
        if ann.width is not None and ann.height is not None:
            if image["width"] is not None and (image["width"], image["height"]) != (ann.width, ann.height):
                errors.append(f"{image_path}: image is {image['width']}x{image['height']} but {xml_path} says "
                              f"{ann.width}x{ann.height}; boxes would not fit the image")
            elif image["width"] is None:
                image["width"], image["height"] = ann.width, ann.height
        width, height = image["width"], image["height"]
        by_text: dict[str, list] = defaultdict(list)
        first_line: dict[str, int] = {}
        for obj in ann.objects:
            first_line.setdefault(obj.name, obj.line)
            problem = box_problem(obj.box, width, height)
            if problem:
                errors.append(f"{xml_path}:{obj.line}: object {obj.name!r}: {problem}")
                continue
            by_text[obj.name].append(list(obj.box))
        texts = {e["text"] for e in entities}
        for name in by_text:
            if name not in texts:
                errors.append(f"{xml_path}:{first_line[name]}: object {name!r} matches no entity of the tweet "
                              f"({block.path}:{block.line}); entities: {sorted(texts)}")
        for ent in entities:
            ent["boxes"] = by_text.get(ent["text"], [])

    record = empty_record(
        id=make_id(source, split, record_key), source=source, split=split, sample_key=record_key,
        text=" ".join(tokens), tokens=tokens, image=image, grounding_labels=GROUNDING_PRESENT, entities=entities,
    )
    if errors:
        record.update(status=STATUS_ERROR, error="; ".join(errors), error_stage="ingest",
                      error_kind=ERROR_PERMANENT)
    return record
