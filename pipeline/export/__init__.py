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
from .examples import Chains, ExportRefused, ExportStats, FrameName, examples, prompt_config
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


def split_records(output_dir: str | Path, split: str) -> Any:
    """The records of a published split, file by file."""
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
        yield from read_records(path)


def export_split(output_dir: str | Path, split: str, fmt: str, target: str | Path, *, images: ImageMode = "relative",
                 frame: FrameName = "original", text_only: bool = False, chains: Chains = "all") -> ExportStats:
    """Write ``split`` of ``output_dir`` in format ``fmt`` under ``target``; raises ``ExportRefused`` (and writes
    nothing further) if a record that is not a training record of that split turns up."""
    if fmt not in WRITERS:
        raise ExportError(f"--format {fmt!r}: choose one of {list(FORMATS)}")
    out, target = Path(output_dir), Path(target)
    records = split_records(out, split)
    first = next(records, None)  # fail on a missing split before creating the target
    target.mkdir(parents=True, exist_ok=True)
    prompt = prompt_config(frame, text_only)
    stats = ExportStats()

    def all_records() -> Any:
        if first is not None:
            yield first
        yield from records

    items = examples(all_records(), split, prompt, chains, _dataset_config(out), stats)
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
