"""Shard files: atomic Parquet writes, commit markers, and the folder layout of a stage's output.

A stage's output for input shard ``i`` is ``<stage dir>/shard-<i>.parquet``, written to a temporary file and renamed
into place, followed by ``shard-<i>.done.json`` (the commit marker, holding the shard's stats). Only a shard with a
marker counts as done: a crash between the rename and the marker just redoes that shard, and since the file name is
fixed by the input shard, a redo replaces the file instead of adding a second copy. That is what makes runs
exactly-once at the record level.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import pyarrow.parquet as pq

from .atomic import TMP_MARK, atomic_open, write_bytes_atomic
from .schema import records_to_table, table_to_records

SHARD_GLOB = "shard-*.parquet"
MANIFEST = "_stage.json"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def shard_path(stage_dir: str | Path, index: int) -> Path:
    return Path(stage_dir) / f"{shard_name(index)}.parquet"


def marker_path(stage_dir: str | Path, index: int) -> Path:
    return Path(stage_dir) / f"{shard_name(index)}.done.json"


def shard_index(path: str | Path) -> int:
    return int(Path(path).name.split(".")[0].split("-")[1])


def write_json_atomic(path: str | Path, payload: Any) -> None:
    data = (json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n").encode()
    write_bytes_atomic(path, data, durable=True)


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def write_records(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    """Write records with the record schema to ``path`` atomically. Returns the row count."""
    table = records_to_table(records)
    with atomic_open(path, "wb", durable=True) as fh:
        pq.write_table(table, fh, compression="zstd")
    return table.num_rows


def read_records(path: str | Path, columns: list[str] | None = None) -> list[dict[str, Any]]:
    if columns is not None:
        return pq.read_table(path, columns=columns).to_pylist()
    return table_to_records(pq.read_table(path))


def commit_shard(stage_dir: str | Path, index: int, stats: dict[str, Any]) -> None:
    write_json_atomic(marker_path(stage_dir, index), stats)


def is_committed(stage_dir: str | Path, index: int) -> bool:
    return marker_path(stage_dir, index).is_file() and shard_path(stage_dir, index).is_file()


def committed_indices(stage_dir: str | Path) -> set[int]:
    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        return set()
    return {i for p in stage_dir.glob("shard-*.done.json") if shard_path(stage_dir, i := shard_index(p)).is_file()}


def read_markers(stage_dir: str | Path) -> dict[int, dict[str, Any]]:
    stage_dir = Path(stage_dir)
    out = {}
    for p in sorted(stage_dir.glob("shard-*.done.json")):
        try:
            out[shard_index(p)] = read_json(p)
        except (OSError, ValueError):
            continue  # a marker is written atomically; an unreadable one is treated as absent
    return out


def remove_stale_temporaries(stage_dir: str | Path) -> int:
    """Delete temporary files left by a killed process. Only call while holding the output folder's lock."""
    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        return 0
    n = 0
    for p in stage_dir.iterdir():
        if TMP_MARK in p.name:
            p.unlink(missing_ok=True)
            n += 1
    return n
