"""``gmner-pipeline export``: a published split (``<output>/dataset/<split>``) as training data for other trainers.

``examples`` turns records into examples with the one student prompt builder, ``formats`` writes them (ms-swift,
LLaMA-Factory ShareGPT, Hugging Face Parquet with embedded images, plain JSONL). ``export.json`` beside the files
records the split, the format, the frame and the prompt's hash.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from ..publish import DATASET_DIR, SPLIT_NAMES
from ..shards import read_records
from ..splits import DatasetConfig
from ..student import prompt_hash
from .examples import Chains, ExportRefused, ExportStats, FrameName, check_training, examples, prompt_config
from .formats import WRITERS, ImageMode, ImageRefs

FORMATS = tuple(WRITERS)
MANIFEST = "export.json"

__all__ = ["FORMATS", "ExportRefused", "ExportStats", "export_split", "split_records"]


class ExportError(ValueError):
    """The export cannot start (no such split, an unknown format); the message says what to do."""


def _dataset_config(output_dir: Path) -> DatasetConfig:
    path = output_dir / "config.yaml"
    raw = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.is_file() else {}
    return DatasetConfig.model_validate(raw.get("dataset") or {})


# what check_training reads: the whole split is checked with these columns before anything is written
CHECK_COLUMNS = ["id", "split", "status", "cot", "grpo"]


def split_records(output_dir: str | Path, split: str, columns: list[str] | None = None) -> Any:
    """The records of a published split, file by file (``columns``: only those)."""
    folder = Path(output_dir) / DATASET_DIR / split
    if split not in SPLIT_NAMES:
        raise ExportError(f"--split {split!r}: choose one of {list(SPLIT_NAMES)}")
    files = sorted(folder.glob("*.parquet"))
    if not files:
        root = Path(output_dir) / DATASET_DIR
        present = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        why = f"published: {', '.join(present)}" if present else "no dataset: run a pipeline with a CoT stage first"
        raise ExportError(f"{output_dir} has no published {split} ({why})")
    for path in files:
        yield from read_records(path, columns)


def check_split(output_dir: str | Path, split: str, dataset: DatasetConfig) -> int:
    """Refuse the export before writing anything if any record of the split is not a training record of it (a dev or
    test record, or one the split does not select); returns the number of records."""
    n = 0
    for record in split_records(output_dir, split, CHECK_COLUMNS):
        check_training(record, split, dataset)
        n += 1
    return n


def export_split(output_dir: str | Path, split: str, fmt: str, target: str | Path, *, images: ImageMode = "relative",
                 frame: FrameName = "original", text_only: bool = False, chains: Chains = "all") -> ExportStats:
    """Write ``split`` of ``output_dir`` in format ``fmt`` under ``target``; raises ``ExportRefused``, having written
    nothing, if any record of the split is not a training record of it (checked over the whole split first)."""
    if fmt not in WRITERS:
        raise ExportError(f"--format {fmt!r}: choose one of {list(FORMATS)}")
    out, target = Path(output_dir), Path(target)
    dataset = _dataset_config(out)
    check_split(out, split, dataset)  # a missing split or a record that must not be exported: nothing is written
    target.mkdir(parents=True, exist_ok=True)
    prompt = prompt_config(frame, text_only)
    stats = ExportStats()
    items = examples(split_records(out, split), split, prompt, chains, dataset, stats)
    files = WRITERS[fmt](items, split, target, ImageRefs(target, images))
    manifest = {"split": split, "format": fmt, "images": "embedded" if fmt == "hf" else images,
                "frame": prompt.frame.model_dump(mode="json"), "text_only": text_only, "chains": chains,
                "prompt_hash": prompt_hash(prompt), "records": stats.records, "examples": stats.examples,
                "skipped": stats.skipped, "files": sorted(str(p.relative_to(target)) for p in files)}
    path = target / MANIFEST
    existing = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    existing[f"{fmt}:{split}"] = manifest
    path.write_text(json.dumps(existing, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return stats
