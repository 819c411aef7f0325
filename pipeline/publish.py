"""The run's dataset: its training splits as per-split Parquet folders, written at the end of every complete run.

    <output>/dataset/D1/part-00000.parquet ...           SFT (MCR's MRSI): training records with a consistent chain
    <output>/dataset/D2/part-00000.parquet ...           GRPO (CVO): the rest of the training records with a chain
    <output>/dataset/D2_filtered/part-00000.parquet ...  D2 records grpo_filter kept (only when a stage wrote grpo)

Files are in the record schema (``schema.RECORD_SCHEMA``), so the trainer, ``export`` and ``datasets.load_dataset``
read them directly (the dataset card at ``<output>/README.md`` maps the folders to splits). Which record goes where is
decided upstream, once: ``cot.split`` (written by the CoT stage through ``splits.dataset_split``) and ``grpo.keep``
(grpo_filter). Publishing only selects, and refuses any record whose source split is not a training split, so dev and
test records cannot reach D1, D2 or an export even if a stage got the split wrong.

The folder is rebuilt from the final stage's committed shards in a temporary folder and swapped into place, so a
reader never sees half of one run and half of another. A run with failed shards publishes nothing (the previous
dataset stays) and says so. A bucket has no folder rename: there the parts are written in place (each a whole-object
PUT) and the parts the new dataset does not have are deleted afterwards, so a reader during publishing may see a mix
of the two runs' parts.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow.parquet as pq

from .atomic import atomic_open
from .schema import records_to_table, table_to_records
from .shards import iter_committed_tables, shard_index
from .splits import D1, D2, DatasetConfig, is_training_record
from .storage import is_remote

log = logging.getLogger(__name__)

DATASET_DIR = "dataset"
D2_FILTERED = "D2_filtered"
SPLIT_NAMES = (D1, D2, D2_FILTERED)
Record = dict[str, Any]


def has_consistent_chain(record: Record) -> bool:
    return any(c.get("consistent") for c in ((record.get("cot") or {}).get("chains") or []))


def _in(split: str) -> Callable[[Record], bool]:
    def select(record: Record) -> bool:
        return (record.get("status") == "ok" and (record.get("cot") or {}).get("split") == split
                and has_consistent_chain(record))
    return select


def _kept_by_grpo_filter(record: Record) -> bool:
    return _in(D2)(record) and (record.get("grpo") or {}).get("keep") is True


SELECTORS: dict[str, Callable[[Record], bool]] = {D1: _in(D1), D2: _in(D2), D2_FILTERED: _kept_by_grpo_filter}


def split_of_records(records: list[Record], config: DatasetConfig, with_filtered: bool) -> dict[str, list[Record]]:
    """The records of each published split (a record is in D1 or D2, and may also be in D2_filtered)."""
    out: dict[str, list[Record]] = {name: [] for name in SPLIT_NAMES if with_filtered or name != D2_FILTERED}
    for rec in records:
        for name in out:
            if SELECTORS[name](rec):
                if not is_training_record(rec, config):
                    raise ValueError(f"record {rec.get('id')!r} of source split {rec.get('split')!r} is marked "
                                     f"{name}; only {config.training_splits} records may enter training data")
                out[name].append(rec)
    return out


def split_parts(final_dir: Any, config: DatasetConfig, with_filtered: bool) -> Iterator[tuple[str, str, Any]]:
    """Each non-empty part of the published splits, in shard order: (split, part file name, Arrow table), one per
    split of each committed shard of ``final_dir``."""
    for path, table in iter_committed_tables(final_dir):
        name_of_part = f"part-{shard_index(path):05d}.parquet"
        for name, selected in split_of_records(table_to_records(table), config, with_filtered).items():
            if selected:
                yield name, name_of_part, records_to_table(selected)


def publish_dataset(final_dir: Path, output_dir: Path, config: DatasetConfig, *, with_filtered: bool,
                    run_id: str) -> dict[str, int]:
    """Rebuild ``<output_dir>/dataset`` from the committed shards of ``final_dir``; returns records per split."""
    if is_remote(output_dir):
        return _publish_in_place(final_dir, output_dir, config, with_filtered)
    target = output_dir / DATASET_DIR
    staging = output_dir / f".{DATASET_DIR}.tmp-{run_id}"
    shutil.rmtree(staging, ignore_errors=True)
    counts = {name: 0 for name in SPLIT_NAMES if with_filtered or name != D2_FILTERED}
    for name, part, table in split_parts(final_dir, config, with_filtered):
        path = staging / name / part
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path, compression="zstd")
        counts[name] += table.num_rows
    staging.mkdir(parents=True, exist_ok=True)
    old = output_dir / f".{DATASET_DIR}.old-{run_id}"
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    log.info("dataset: %s -> %s", ", ".join(f"{k} {v}" for k, v in counts.items()), target)
    return counts


def _publish_in_place(final_dir: Any, output_dir: Any, config: DatasetConfig, with_filtered: bool) -> dict[str, int]:
    """``publish_dataset`` on an object store (see the module docstring)."""
    target = output_dir / DATASET_DIR
    counts = {name: 0 for name in SPLIT_NAMES if with_filtered or name != D2_FILTERED}
    written: set[str] = set()
    for name, part, table in split_parts(final_dir, config, with_filtered):
        path = target / name / part
        with atomic_open(path, "wb") as fh:
            pq.write_table(table, fh, compression="zstd")
        written.add(str(path))
        counts[name] += table.num_rows
    for old in list(target.rglob_files()):
        if str(old) not in written:
            old.unlink(missing_ok=True)
    log.info("dataset: %s -> %s", ", ".join(f"{k} {v}" for k, v in counts.items()), target)
    return counts
