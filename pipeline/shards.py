"""Shard files: atomic Parquet writes, commit markers, and the folder layout of a stage's output.

A stage's output for input shard ``i`` is ``<stage dir>/shard-<i>.parquet``, written to a temporary file and renamed
into place, followed by ``shard-<i>.done.json`` (the commit marker, holding the shard's stats). Only a shard with a
marker counts as done: a crash between the rename and the marker just redoes that shard, and since the file name is
fixed by the input shard, a redo replaces the file instead of adding a second copy. That is what makes runs
exactly-once at the record level.

On an object store (``s3://``, ``gs://``; ``storage.py``) the same protocol holds with whole-object PUTs in place of
the temporary file and the rename: the data object first, the marker last.

Readers of a stage's output read only committed shards (``committed_shards`` and the iterators built on it): a file
without its marker is a shard being written, or one the runner voided, and is never data. When the runner voids a
downstream shard (its input is about to be recomputed), ``void_shard`` removes the marker first, then the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import TMP_MARK, atomic_open, write_bytes_atomic
from .schema import RECORD_SCHEMA, conform_table, records_to_table
from .storage import ObjectPath, arrow_source, is_remote, location

if TYPE_CHECKING:
    import datasets

SHARD_GLOB = "shard-*.parquet"
MANIFEST = "_stage.json"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def shard_path(stage_dir: str | Path, index: int) -> Path:
    return location(stage_dir) / f"{shard_name(index)}.parquet"  # type: ignore[return-value]


def marker_path(stage_dir: str | Path, index: int) -> Path:
    return location(stage_dir) / f"{shard_name(index)}.done.json"  # type: ignore[return-value]


def shard_index(path: str | Path) -> int:
    return int(location(path).name.split(".")[0].split("-")[1])


def write_json_atomic(path: str | Path, payload: Any) -> None:
    data = (json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n").encode()
    write_bytes_atomic(path, data, durable=True)


def read_json(path: str | Path) -> Any:
    if is_remote(path):
        return json.loads(location(path).read_text())
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def write_records(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    """Write records with the record schema to ``path`` atomically. Returns the row count."""
    table = records_to_table(records)
    with atomic_open(path, "wb", durable=True) as fh:
        pq.write_table(table, fh, compression="zstd")
    return table.num_rows


def read_table(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """One shard file as a table with the record schema (or its ``columns``), older MINOR versions brought up to date;
    raises ``schema.SchemaMismatch`` for another MAJOR version."""
    where, filesystem = arrow_source(path)
    if columns is None:
        return conform_table(pq.read_table(where, filesystem=filesystem))
    present = set(pq.read_schema(where, filesystem=filesystem).names)
    table = pq.read_table(where, columns=[c for c in columns if c in present], filesystem=filesystem)
    return conform_table(table, columns)


def read_records(path: str | Path, columns: list[str] | None = None) -> list[dict[str, Any]]:
    """One shard file's records (committed or not: use ``iter_committed_records`` to read a stage's output)."""
    return read_table(path, columns).to_pylist()


def commit_shard(stage_dir: str | Path, index: int, stats: dict[str, Any]) -> None:
    write_json_atomic(marker_path(stage_dir, index), stats)


def is_committed(stage_dir: str | Path, index: int) -> bool:
    return marker_path(stage_dir, index).is_file() and shard_path(stage_dir, index).is_file()


def _listed(stage_dir: ObjectPath) -> tuple[set[int], set[int]]:
    """A bucket prefix's shard files and markers, from one LIST (not a request per shard)."""
    names = {p.name for p in stage_dir.iterdir()}
    files = {shard_index(n) for n in names if n.startswith("shard-") and n.endswith(".parquet")}
    markers = {shard_index(n) for n in names if n.startswith("shard-") and n.endswith(".done.json")}
    return files, markers


def committed_indices(stage_dir: str | Path) -> set[int]:
    if is_remote(stage_dir):
        files, markers = _listed(location(stage_dir))  # type: ignore[arg-type]
        return files & markers
    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        return set()
    return {i for p in stage_dir.glob("shard-*.done.json") if shard_path(stage_dir, i := shard_index(p)).is_file()}


def read_markers(stage_dir: str | Path) -> dict[int, dict[str, Any]]:
    """The commit markers (shard stats) of the committed shards, by shard index."""
    if is_remote(stage_dir):
        out = {}
        for index in sorted(committed_indices(stage_dir)):
            try:
                out[index] = read_json(marker_path(stage_dir, index))
            except (OSError, ValueError):
                continue
        return out
    stage_dir = Path(stage_dir)
    out = {}
    for p in sorted(stage_dir.glob("shard-*.done.json")):
        index = shard_index(p)
        if not shard_path(stage_dir, index).is_file():
            continue
        try:
            out[index] = read_json(p)
        except (OSError, ValueError):
            continue  # a marker is written atomically; an unreadable one is treated as absent
    return out


def void_shard(stage_dir: str | Path, index: int) -> None:
    """Un-commit a shard: the marker goes first (so a crash in between leaves an uncommitted file, which readers
    ignore and the next run overwrites), then the file."""
    marker_path(stage_dir, index).unlink(missing_ok=True)
    shard_path(stage_dir, index).unlink(missing_ok=True)


# --- reading a stage's output: committed shards only -----------------------------------------------------------------

def committed_shards(stage_dir: str | Path) -> list[Path]:
    """The shard files of a stage folder that carry their commit marker, in shard order."""
    stage_dir = location(stage_dir)  # type: ignore[assignment]
    return [shard_path(stage_dir, i) for i in sorted(committed_indices(stage_dir))]


def iter_committed_tables(stage_dir: str | Path, columns: list[str] | None = None) -> Iterator[tuple[Path, pa.Table]]:
    """``(shard file, table)`` for every committed shard of a stage folder, in shard order."""
    for path in committed_shards(stage_dir):
        yield path, read_table(path, columns)


def iter_committed_records(stage_dir: str | Path, columns: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """Every record of a stage's committed output, shard by shard (memory: one shard at a time)."""
    for _, table in iter_committed_tables(stage_dir, columns):
        yield from table.to_pylist()


def committed_table(stage_dir: str | Path, columns: list[str] | None = None) -> pa.Table:
    """A stage's committed output as one Arrow table with the record schema (or its ``columns``)."""
    tables = [table for _, table in iter_committed_tables(stage_dir, columns)]
    if tables:
        return pa.concat_tables(tables)
    schema = RECORD_SCHEMA if columns is None else pa.schema([RECORD_SCHEMA.field(c) for c in columns])
    return schema.empty_table()


def committed_dataset(stage_dir: str | Path, columns: list[str] | None = None) -> "datasets.Dataset":
    """A stage's committed output as a Hugging Face ``datasets.Dataset`` (in memory), e.g. for train/."""
    from datasets import Dataset
    from datasets.table import InMemoryTable

    return Dataset(InMemoryTable(committed_table(stage_dir, columns)))


def remove_stale_temporaries(stage_dir: str | Path) -> int:
    """Delete temporary files left by a killed process. Only call while holding the output folder's lock."""
    if is_remote(stage_dir):
        return 0  # whole-object PUTs leave no temporaries behind
    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        return 0
    n = 0
    for p in stage_dir.iterdir():
        if TMP_MARK in p.name:
            p.unlink(missing_ok=True)
            n += 1
    return n
