"""Shard files: atomic Parquet writes, commit markers, and the folder layout of a stage's output.

A stage's output for input shard ``i`` is ``<stage dir>/shard-<i>.parquet``, written to a temporary file and renamed
into place, followed by ``shard-<i>.done.json`` (the commit marker, holding the shard's stats). Only a shard with a
marker counts as done: a crash between the rename and the marker just redoes that shard, and since the file name is
fixed by the input shard, a redo replaces the file instead of adding a second copy. That is what makes runs
exactly-once at the record level.

On an object store (``s3://``, ``gs://``; ``storage.py``) the same protocol holds with whole-object PUTs in place of
the temporary file and the rename: the data object first, the marker last. The checks below hold there too (sizes and
footers read through pyarrow's filesystem; a bucket's folder is scanned with one LIST and checked in parallel).

Readers of a stage's output read only committed shards (``committed_shards`` and the iterators built on it): a file
without its marker is a shard being written, or one the runner voided, and is never data. When the runner voids a
downstream shard (its input is about to be recomputed), ``void_shard`` removes the marker first, then the file.

A marker is trusted only as far as it can be checked cheaply (``shard_problem``, the one check the runner, ``status``,
``show``, ``view`` and the readers share): it must be a JSON object, its shard file must have the byte size the marker
recorded, and the file's Parquet footer must hold the row count the marker recorded. A truncated or replaced file, or a
marker that is empty, garbage or disagrees, makes the shard *not committed* everywhere, and the next run redoes it.
Each marker also names its commit (``commit_id``) and the commit of the input shard it was made from
(``input_commit``), so the runner can tell a downstream shard made from the input that is there now from one made from
an input that has since been recomputed (``scheduler.ShardBook``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import TMP_MARK, atomic_open, write_bytes_atomic
from .schema import RECORD_SCHEMA, conform_table, records_to_table
from .storage import ObjectPath, arrow_source, is_remote, location

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

SHARD_GLOB = "shard-*.parquet"
MARKER_GLOB = "shard-*.done.json"
MANIFEST = "_stage.json"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def shard_path(stage_dir: str | Path, index: int) -> Path:
    return location(stage_dir) / f"{shard_name(index)}.parquet"  # type: ignore[return-value]


def marker_path(stage_dir: str | Path, index: int) -> Path:
    return location(stage_dir) / f"{shard_name(index)}.done.json"  # type: ignore[return-value]


def beat_path(stage_dir: str | Path, index: int) -> Path:
    """The file a worker touches while it works on shard ``index`` (after every batch): the driver's watchdog reads
    its modification time. A temporary by name, so a run's start-up cleans up what a killed worker left."""
    return location(stage_dir) / f"{shard_name(index)}{TMP_MARK}beat.tmp"  # type: ignore[return-value]


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


def marker_of(shard_file: str | Path) -> Path:
    """The commit marker beside a shard file (``shard-00003.parquet`` -> ``shard-00003.done.json``)."""
    shard_file = location(shard_file)  # type: ignore[assignment]
    return shard_file.with_name(shard_file.name.removesuffix(".parquet") + ".done.json")


def file_facts(path: str | Path) -> dict[str, int]:
    """What a marker records of its shard file: byte size and the row count in the Parquet footer."""
    where, filesystem = arrow_source(path)
    return {"bytes": location(path).stat().st_size, "rows": pq.read_metadata(where, filesystem=filesystem).num_rows}


def commit_shard(stage_dir: str | Path, index: int, stats: dict[str, Any], *, input_commit: str | None = None,
                 replaces: Iterable[str] = ()) -> dict[str, Any]:
    """Commit shard ``index`` (its file must be in place): write its marker with ``stats`` plus what the checks need:
    the file's size and row count, a new ``commit_id``, the ``input_commit`` it was made from, and (for a repaired
    shard) the commit ids it ``replaces``. Returns the marker."""
    return commit_file(shard_path(stage_dir, index), marker_path(stage_dir, index), stats, input_commit=input_commit,
                       replaces=replaces)


def commit_file(data: Path, marker_file: Path, stats: dict[str, Any], *, input_commit: str | None = None,
                replaces: Iterable[str] = ()) -> dict[str, Any]:
    """Commit a Parquet file already in place with its marker (``commit_shard``; a keyed table's units use it too)."""
    marker = dict(stats)
    marker.update(file=file_facts(data), commit_id=uuid.uuid4().hex[:16], committed_at=time.time(),
                  input_commit=input_commit, replaces=list(replaces))
    write_json_atomic(marker_file, marker)
    return marker


# A verified marker is remembered under the stat signatures of both files, so a scan repeated in one process (status
# of a large folder, the runner's checks) reads each footer once; any write changes a signature.
_VERIFIED: "OrderedDict[str, tuple[tuple, dict[str, Any] | None, str | None]]" = OrderedDict()
_VERIFIED_MAX = 65536


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat() if isinstance(path, ObjectPath) else os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


def check_shard(stage_dir: str | Path, index: int) -> tuple[dict[str, Any] | None, str | None]:
    """``(marker, None)`` when shard ``index`` of ``stage_dir`` is committed and intact, else ``(None, problem)``:
    no marker; a marker that is unreadable, empty or not an object (an unreadable marker is an absent marker); no
    shard file; a file whose size or footer row count differs from the marker's (truncated, replaced, damaged).
    Markers written before they recorded the file are checked by their ``records_in`` against the footer."""
    return check_commit(marker_path(stage_dir, index), shard_path(stage_dir, index))


def check_commit(mpath: Path, spath: Path, legacy_rows: str = "records_in") -> tuple[dict[str, Any] | None, str | None]:
    """``check_shard`` for any committed Parquet file and its marker (a keyed table's units use it too);
    ``legacy_rows``: the marker field that held the row count before markers recorded the file."""
    sig = (_signature(mpath), _signature(spath))
    key = str(mpath)
    # an object's signature is only its size and a one-second mtime: a redo within that second could look unchanged
    cacheable = sig[0] is not None and sig[1] is not None and not is_remote(mpath)
    hit = _VERIFIED.get(key)
    if hit is not None and hit[0] == sig and cacheable:
        return hit[1], hit[2]
    marker, problem = _check(mpath, spath, sig, legacy_rows)
    if cacheable:
        _VERIFIED[key] = (sig, marker, problem)
        _VERIFIED.move_to_end(key)
        while len(_VERIFIED) > _VERIFIED_MAX:
            _VERIFIED.popitem(last=False)
    return marker, problem


def _check(mpath: Path, spath: Path, sig: tuple, legacy_rows: str) -> tuple[dict[str, Any] | None, str | None]:
    if sig[0] is None:
        return None, "no commit marker"
    try:
        marker = read_json(mpath)
    except (OSError, ValueError) as exc:
        return None, f"commit marker unreadable ({type(exc).__name__})"
    if not isinstance(marker, dict):
        return None, "commit marker holds no record of the commit"
    if sig[1] is None:
        return None, "the shard file is missing"
    facts = marker.get("file")
    expected_rows = facts.get("rows") if isinstance(facts, dict) else marker.get(legacy_rows)
    if isinstance(facts, dict) and facts.get("bytes") != sig[1][0]:
        return None, f"the shard file has {sig[1][0]} bytes, its marker recorded {facts.get('bytes')} (truncated or " \
                     "replaced)"
    try:
        where, filesystem = arrow_source(spath)
        rows = pq.read_metadata(where, filesystem=filesystem).num_rows
    except (OSError, ValueError, pa.ArrowException) as exc:
        return None, f"the shard file is not readable Parquet ({str(exc)[:120]})"
    if not isinstance(expected_rows, int) or rows != expected_rows:
        return None, f"the shard file holds {rows} rows, its marker recorded {expected_rows}"
    return marker, None


def shard_problem(stage_dir: str | Path, index: int) -> str | None:
    """Why shard ``index`` is not committed (see ``check_shard``), or None when it is."""
    return check_shard(stage_dir, index)[1]


def is_committed(stage_dir: str | Path, index: int) -> bool:
    return check_shard(stage_dir, index)[1] is None


def marker_indices(stage_dir: str | Path) -> list[int]:
    """Indices of the shards that have a marker file (committed or not), sorted."""
    stage_dir = location(stage_dir)  # type: ignore[assignment]
    if not stage_dir.is_dir():
        return []
    return sorted(shard_index(p) for p in stage_dir.glob(MARKER_GLOB))


def scan_stage(stage_dir: str | Path) -> tuple[dict[int, dict[str, Any]], dict[int, str]]:
    """``(committed, damaged)``: the markers of the intact committed shards, and why each other marker does not
    commit its shard."""
    committed: dict[int, dict[str, Any]] = {}
    damaged: dict[int, str] = {}
    indices = marker_indices(stage_dir)
    if is_remote(stage_dir) and len(indices) > 1:  # a few requests per shard: overlap their latency
        with ThreadPoolExecutor(16) as pool:
            checks = list(pool.map(lambda i: check_shard(stage_dir, i), indices))
    else:
        checks = [check_shard(stage_dir, i) for i in indices]
    for index, (marker, problem) in zip(indices, checks):
        if marker is not None:
            committed[index] = marker
        else:
            damaged[index] = problem or "unknown"
    return committed, damaged


def committed_indices(stage_dir: str | Path) -> set[int]:
    return set(scan_stage(stage_dir)[0])


def read_markers(stage_dir: str | Path) -> dict[int, dict[str, Any]]:
    """The commit markers (shard stats) of the committed, intact shards, by shard index."""
    return scan_stage(stage_dir)[0]


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


def remove_stale_temporaries(folder: str | Path) -> int:
    """Delete what killed processes left in ``folder``: temporary files and folders (``TMP_MARK`` in the name). Only
    call while holding the output folder's lock. Returns how many were removed."""
    folder = location(folder)  # type: ignore[assignment]
    if not folder.is_dir():
        return 0
    n = 0
    for p in folder.iterdir():
        if TMP_MARK not in p.name:
            continue
        if isinstance(p, ObjectPath):  # in a bucket: a worker's beat object (whole-object PUTs leave no others)
            p.remove_tree() if p.is_dir() else p.unlink(missing_ok=True)
        elif p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        n += 1
    return n
