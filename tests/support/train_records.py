"""Small training inputs for the trainer's tests: records with short consistent chains, written as committed shards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gmner_pipeline.answer import format_turn
from gmner_pipeline.schema import empty_record
from gmner_pipeline.shards import commit_shard, write_records

THINK = "Alice Smith is a person and is visible at [10,5,50,70]. Paris is a place, not shown."
ANSWER = "Alice Smith|PER|[10,5,50,70]; Paris|LOC|None"


def toy_image(folder: Path, width: int = 100, height: int = 80) -> Path:
    from PIL import Image

    path = folder / f"img-{width}x{height}.png"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (width, height), (120, 60, 30)).save(path)
    return path


def toy_record(i: int, *, split: str = "train", cot_split: str | None = "D1", image: Path | None = None,
               width: int = 100, height: int = 80, consistent: bool = True, **fields: Any) -> dict[str, Any]:
    tokens = ["Alice", "Smith", "visits", "Paris", f"#{i}"]
    entities = [
        {"text": "Alice Smith", "start": 0, "end": 2, "type": "PER", "fine_type": None,
         "boxes": [[10.0, 5.0, 50.0, 70.0]]},
        {"text": "Paris", "start": 3, "end": 4, "type": "LOC", "fine_type": None, "boxes": []},
    ]
    chain = {"style": "template", "route": "entity_first", "model_id": None, "seed": 0, "think": THINK,
             "answer": ANSWER, "text": format_turn(THINK, ANSWER), "consistent": consistent,
             "rejection": None if consistent else "answer differs from gold", "attempts": 1}
    record = empty_record(
        id=f"toy/{split}/{i}", source="toy", split=split, sample_key=str(i), text=" ".join(tokens), tokens=tokens,
        image={"path": str(image) if image else None, "uri": None, "sha256": None, "width": width, "height": height},
        grounding_labels="present", entities=entities, cot={"chains": [chain], "split": cot_split, "skipped": None})
    record.update(fields)
    return record


def write_stage(folder: Path, records: list[dict[str, Any]], shard_size: int = 4) -> Path:
    """Records as a stage folder of committed shards."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, start in enumerate(range(0, len(records), shard_size)):
        write_records(folder / f"shard-{index:05d}.parquet", records[start:start + shard_size])
        commit_shard(folder, index, {"records": len(records[start:start + shard_size])})
    return folder
