"""Keyed tables: values a stage computes once per key over its WHOLE input, then joins to every record that needs them.

Some work belongs to a key, not to a record: the knowledge stage asks its LLMs about an entity once, however many
tweets mention it. The one-shard-in, one-shard-out model cannot express that (two actors would ask about the same
entity at the same time, and which tweet gives the context would depend on the sharding), so a stage can opt in to a
**keyed table** (``Stage.table_keys`` + ``Stage.build_table`` / ``abuild_table``, docs/writing-a-stage.md):

1. **Table pass.** Once every input shard of the stage is committed, the scheduler runs ``units`` table tasks on the
   stage's own workers. Unit ``u`` reads the stage's input, asks ``table_keys(record)`` of every active record, keeps
   the keys with ``unit_of(key) == u`` and, per key, the occurrence with the lowest ``(rank, record id, position)``:
   a choice that depends on the input only, never on shard order, shard size or pool size. It hands those
   ``{key: item}`` to the stage, writes ``{key: value}`` to ``unit-<u>.parquet`` (sorted by key) and commits it with
   ``unit-<u>.done.json`` (its stats, counters included), exactly like a shard.
2. **Shard pass.** Then the stage's shards run as usual; before each batch the framework looks up the batch's keys
   (``TableFiles.lookup``, reading only the units those keys live in) and hands them to the stage as ``self.table``.

Guarantees: each key is computed by exactly one committed unit (a unit redone after a crash replaces its file; the
LLM request cache answers what it had already asked), so the calls are one per key however the input is sharded and
however many actors run; a rerun finds every unit and shard committed and computes nothing. The table is valid only
for the input it was built from: ``_table.json`` records the units and a fingerprint of the input's commit markers,
and when the input changed (an upstream shard recomputed), the table and every committed shard of the stage are
voided and rebuilt. The price is a barrier: a keyed stage starts its shards only when its whole input is there (the
stages before it still pipeline), and an upstream shard that fails for good fails the keyed stage for that run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_open
from .schema import ERROR_PERMANENT, STATUS_ERROR
from .shards import check_commit, commit_file, read_json, read_markers, write_json_atomic
from .storage import arrow_source, location

TABLE_DIR = "_table"
TABLE_MANIFEST = "_table.json"
TABLE_SCHEMA = pa.schema([("key", pa.string()), ("value", pa.string())])  # value: JSON text
ROW_GROUP = 2048  # rows per Parquet row group: a lookup reads only the groups whose key range can hold its keys


@dataclass(frozen=True)
class TableKey:
    """One thing a record needs from the keyed table.

    ``key``: what is computed once (the knowledge stage: entity text and type). ``item``: what to compute it from
    (JSON-able; the stage's ``build_table`` receives it). ``rank``: among the occurrences of a key, the one with the
    lowest ``(rank, record id, position in the record)`` is the one whose item is used."""

    key: str
    item: dict[str, Any] = field(default_factory=dict)
    rank: int = 0


@dataclass(frozen=True)
class TableRef:
    """Where a keyed stage's table lives and into how many units it is cut."""

    dir: str
    units: int


def table_dir(stage_dir: str | Path) -> Path:
    return location(stage_dir) / TABLE_DIR


def unit_of(key: str, units: int) -> int:
    """The unit a key belongs to: a stable hash (never Python's salted ``hash``), the same on every machine."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[:8], "big") % units


def unit_name(unit: int) -> str:
    return f"unit-{unit:05d}"


def unit_path(tdir: str | Path, unit: int) -> Path:
    return location(tdir) / f"{unit_name(unit)}.parquet"


def unit_marker_path(tdir: str | Path, unit: int) -> Path:
    return location(tdir) / f"{unit_name(unit)}.done.json"


def check_unit(tdir: str | Path, unit: int) -> tuple[dict[str, Any] | None, str | None]:
    """``shards.check_shard`` for a table unit: its marker, or why the unit is not committed (no marker, no file, a
    file whose size or row count differs from what its marker recorded)."""
    return check_commit(unit_marker_path(tdir, unit), unit_path(tdir, unit), "keys")


def committed_units(tdir: str | Path, units: int) -> set[int]:
    """The units whose marker and file are intact (a damaged unit is built again)."""
    return {u for u in range(units) if check_unit(tdir, u)[0] is not None}


def read_unit_markers(tdir: str | Path) -> dict[int, dict[str, Any]]:
    """The commit markers (stats) of the intact committed units of a table folder."""
    out = {}
    tdir = location(tdir)
    if not tdir.is_dir():
        return out
    for p in sorted(tdir.glob("unit-*.done.json")):
        try:
            unit = int(p.name.split(".")[0].split("-")[1])
        except (IndexError, ValueError):
            continue
        marker, _ = check_unit(tdir, unit)
        if marker is not None:
            out[unit] = marker
    return out


def value_error_kind(value: Any) -> str | None:
    """A table value that failed (a dict with ``status: "error"``, as a record) and its ``error_kind`` (``transient``:
    a rerun computes it again, like a record's; ``permanent`` when unmarked); None for a value that did not fail."""
    if isinstance(value, dict) and value.get("status") == STATUS_ERROR:
        return value.get("error_kind") or ERROR_PERMANENT
    return None


# --- the table pass (pure, then files) ------------------------------------------------------------------------------

def collect_items(keys_of: Callable[[dict[str, Any]], Iterable[TableKey]], records: Iterable[dict[str, Any]],
                  unit: int | None = None, units: int = 1) -> dict[str, dict[str, Any]]:
    """``{key: item}`` for the keys of ``records`` (only those of ``unit`` when given), each key's item taken from its
    occurrence with the lowest ``(rank, record id, position)``; sorted by key. The result does not depend on the
    order in which the records come."""
    best: dict[str, tuple[tuple[int, str, int], dict[str, Any]]] = {}
    for record in records:
        for pos, tk in enumerate(keys_of(record)):
            if unit is not None and unit_of(tk.key, units) != unit:
                continue
            order = (tk.rank, str(record.get("id")), pos)
            if tk.key not in best or order < best[tk.key][0]:
                best[tk.key] = (order, tk.item)
    return {k: best[k][1] for k in sorted(best)}


def write_unit(tdir: str | Path, unit: int, values: Mapping[str, Any]) -> int:
    """Write a unit's ``{key: value}`` (values as JSON text, rows sorted by key) atomically; returns the row count."""
    keys = sorted(values)
    table = pa.table({"key": keys, "value": [json.dumps(values[k], sort_keys=True, ensure_ascii=False)
                                             for k in keys]}, schema=TABLE_SCHEMA)
    with atomic_open(unit_path(tdir, unit), "wb", durable=True) as fh:
        pq.write_table(table, fh, compression="zstd", row_group_size=ROW_GROUP)
    return table.num_rows


def read_unit(tdir: str | Path, unit: int) -> dict[str, Any]:
    """A committed unit's ``{key: value}``."""
    where, filesystem = arrow_source(unit_path(tdir, unit))
    table = pq.read_table(where, filesystem=filesystem)
    return {k: json.loads(v) for k, v in zip(table.column("key").to_pylist(), table.column("value").to_pylist())}


def commit_unit(tdir: str | Path, unit: int, stats: dict[str, Any], *, input_commit: str | None = None,
                replaces: Iterable[str] = ()) -> dict[str, Any]:
    """Commit a written unit as a shard is committed (``shards.commit_file``: its size and row count, a commit id, the
    input fingerprint it was built from); returns the marker."""
    return commit_file(unit_path(tdir, unit), unit_marker_path(tdir, unit), stats, input_commit=input_commit,
                       replaces=replaces)


class TableFiles:
    """A committed table, looked up by key: only the units that hold the asked keys are read, and in each only the
    row groups whose key range can contain them."""

    def __init__(self, ref: TableRef):
        self.ref = ref

    def lookup(self, keys: Iterable[str]) -> dict[str, Any]:
        by_unit: dict[int, list[str]] = {}
        for key in set(keys):
            by_unit.setdefault(unit_of(key, self.ref.units), []).append(key)
        out: dict[str, Any] = {}
        for unit, wanted in sorted(by_unit.items()):
            path = unit_path(self.ref.dir, unit)
            if not unit_marker_path(self.ref.dir, unit).is_file():
                raise FileNotFoundError(f"keyed table unit {unit} is not committed in {self.ref.dir}: the table pass "
                                        "must finish before the shards run (rerun the command)")
            where, filesystem = arrow_source(path)
            table = pq.read_table(where, filters=[("key", "in", wanted)], filesystem=filesystem)
            for key, value in zip(table.column("key").to_pylist(), table.column("value").to_pylist()):
                out[key] = json.loads(value)
        return out


class InMemoryTable:
    """A table held in memory (``gmner_pipeline.testing.run_stage`` builds one)."""

    def __init__(self, values: Mapping[str, Any]):
        self.values = dict(values)

    def lookup(self, keys: Iterable[str]) -> dict[str, Any]:
        return {k: self.values[k] for k in set(keys) if k in self.values}


# --- validity: the input a table was built from ---------------------------------------------------------------------

def input_fingerprint(input_dir: str | Path, num_shards: int) -> str:
    """A fingerprint of a stage's input: per shard, the ``commit_id`` of its marker (the lineage the shard checks
    use; markers written before commit ids: what they say about the write). A shard recomputed or repaired upstream
    gets a new commit, so the fingerprint changes and the table is rebuilt."""
    markers = read_markers(input_dir)
    h = hashlib.sha256()
    for i in range(num_shards):
        m = markers.get(i) or {}
        facts = m.get("commit_id") or [m.get("run_id"), m.get("finished_at"), m.get("records_in"), m.get("stage_key")]
        h.update(json.dumps([i, facts], default=str).encode())
    return h.hexdigest()[:16]


def read_manifest(tdir: str | Path) -> dict[str, Any] | None:
    try:
        return read_json(location(tdir) / TABLE_MANIFEST)
    except (OSError, ValueError):
        return None


def write_manifest(tdir: str | Path, units: int, fingerprint: str) -> None:
    location(tdir).mkdir(parents=True, exist_ok=True)
    write_json_atomic(location(tdir) / TABLE_MANIFEST, {"units": units, "input": fingerprint})


def void_table(tdir: str | Path) -> None:
    """Remove a table: the manifest and the markers first (so a crash in between leaves uncommitted files), then
    the unit files."""
    tdir = location(tdir)
    if not tdir.is_dir():
        return
    (tdir / TABLE_MANIFEST).unlink(missing_ok=True)
    for p in tdir.glob("unit-*.done.json"):
        p.unlink(missing_ok=True)
    for p in tdir.glob("unit-*.parquet"):
        p.unlink(missing_ok=True)


__all__ = ["InMemoryTable", "TABLE_DIR", "TableFiles", "TableKey", "TableRef", "check_unit", "collect_items",
           "commit_unit", "committed_units", "read_unit", "value_error_kind", "input_fingerprint", "read_manifest", "read_unit_markers", "table_dir",
           "unit_of", "void_table", "write_manifest", "write_unit"]
