"""A dataset card (``README.md``) in every stage folder, so that ``datasets.load_dataset(<stage folder>)`` reads the
shards and nothing else.

Without it, ``datasets`` guesses the format from the files it finds and picks the most common extension: the commit
markers (``shard-*.done.json``) and ``_stage.json`` outnumber the shards, so it reads the markers as a JSON dataset
and fails. The card's YAML header names the data files explicitly (the Hugging Face convention for a folder of
Parquet files), which leaves the commit protocol and its file names as they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .atomic import write_bytes_atomic
from .schema import SCHEMA_VERSION
from .shards import SHARD_GLOB
from .storage import location

CARD = "README.md"


def card_text(manifest: dict[str, Any]) -> str:
    stage = manifest.get("stage", "?")
    return f"""---
configs:
- config_name: default
  data_files:
  - split: train
    path: "{SHARD_GLOB}"
tags:
- gmner-pipeline
---
# gmner-pipeline output: {stage}

Records of the `{stage}` stage (key `{manifest.get('key', '?')}`), record schema {SCHEMA_VERSION}: one row per input
record, with `status` (`ok` / `dropped` / `error`) and `error` on every row. `_stage.json` holds the stage's
version and config.

A shard `shard-NNNNN.parquet` is committed once its marker `shard-NNNNN.done.json` exists (it holds the shard's
counts); after a run that finished without failed shards every shard is committed. Read the shards with
`datasets.load_dataset("<this folder>")`, `pandas.read_parquet`, DuckDB (`read_parquet('{SHARD_GLOB}')`), polars or
Ray Data; `gmner_pipeline.shards.read_records` reads tables that went through those tools back into records.
"""


def write_dataset_card(stage_dir: str | Path, manifest: dict[str, Any]) -> None:
    write_bytes_atomic(location(stage_dir) / CARD, card_text(manifest).encode())
