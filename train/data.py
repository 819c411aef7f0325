"""Training data: record-schema Parquet -> D1 / D2 records -> SFT examples and GRPO prompts (``datasets``).

Inputs (``--data``, repeatable), each one of:

* a pipeline output folder: ``<out>/dataset/<split>/*.parquet`` when the publish step wrote it, else the final stage
  of ``<out>/latest.json`` (its committed shards);
* a stage folder (its committed shards), a folder of Parquet files, or Parquet files.

Records are selected by ``cot.split`` (``D1`` for SFT, ``D2`` for GRPO; ``data.splits``), which the CoT stage sets via
``gmner_pipeline.splits``. A selected record whose SOURCE split is not a training split (dev, test) is refused with an
error, never trained on. GRPO data can further require ``grpo.keep`` (the records the GRPO filter kept).

Every consistent chain of a record (``cot.chains[*].consistent``) is one SFT example: the user turn from
``student.build_messages``, the assistant turn from ``student.target_turn`` (boxes in the policy's frame). Rows hold
plain strings and numbers (the messages as JSON), so any ``datasets`` backend stores them; the collator builds the
tokens, which is where GRBP perturbs the boxes, so nothing here or in the shards ever changes.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import yaml

from .. import student
from ..answer import format_answer, gold_triples
from ..frames import FrameError, frame_extent, model_image_size
from ..publish import D2_FILTERED, DATASET_DIR
from ..schema import GROUNDING_ABSENT, STATUS_OK
from ..latest import OutputNotFound, load_latest
from ..shards import committed_indices, iter_committed_records, read_records
from ..splits import D2, DatasetConfig, dataset_split, is_training_record
from ..student import StudentPromptConfig
from .config import DataConfig

log = logging.getLogger(__name__)


class DataError(ValueError):
    """The training input cannot be used; the message says what to do."""


@dataclass
class DataStats:
    """What happened to the records read (reported by ``train`` and saved in the run summary)."""

    records_read: int = 0
    records_used: int = 0
    examples: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> records
    errors: list[str] = field(default_factory=list)  # first record-level errors (e.g. an image missing on disk)
    error_count: int = 0

    def error(self, message: str) -> None:
        self.error_count += 1
        if len(self.errors) < 20:
            self.errors.append(message)

    def as_dict(self) -> dict[str, Any]:
        return {"records_read": self.records_read, "records_used": self.records_used, "examples": self.examples,
                "skipped": dict(self.skipped), "errors": self.error_count, "first_errors": self.errors[:5]}


# --- reading ---------------------------------------------------------------------------------------------------------

def read_stage_records(stage_dir: Path) -> Iterator[dict[str, Any]]:
    """Every record of a stage folder's COMMITTED shards, in shard order (one shard in memory at a time)."""
    return iter_committed_records(stage_dir)


@dataclass(frozen=True)
class Source:
    """One input: a stage folder or a Parquet file, with the run config of the output folder it came from."""

    kind: str  # "stage" | "file"
    path: Path
    run_config: dict[str, Any] | None = None

    def records(self) -> Iterator[dict[str, Any]]:
        if self.kind == "stage":
            return read_stage_records(self.path)
        return iter(read_records(self.path))


def _split_folder(dataset_dir: Path, split: str) -> Path | None:
    for name in (split, split.lower(), split.upper()):
        if (dataset_dir / name).is_dir():
            return dataset_dir / name
    return None


def _run_config(out: Path) -> dict[str, Any] | None:
    path = out / "config.yaml"
    if not path.is_file():
        return None
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or None
    except yaml.YAMLError:
        return None


def published_folders(output: Path, splits: Iterable[str], filtered: bool) -> list[Path] | None:
    """``<output>/dataset/<split>`` for each split (``D2_filtered`` for D2 when ``filtered``), or None when the
    output folder has no published dataset or lacks one of them (then its final stage is read)."""
    root = output / DATASET_DIR
    if not root.is_dir():
        return None
    folders = [_split_folder(root, D2_FILTERED if filtered and split == D2 else split) for split in splits]
    if any(f is None for f in folders):
        log.info("%s lacks a published folder for %s: reading the run's final stage", root, list(splits))
        return None
    return folders  # type: ignore[return-value]


def resolve_sources(paths: Iterable[str | Path], splits: Iterable[str], published: bool = True,
                    filtered: bool = False) -> list[Source]:
    """The stage folders and Parquet files behind ``--data`` inputs (see the module docstring). ``filtered`` reads
    a published ``D2_filtered`` for D2. ``published=False`` reads an output folder's final stage even when it has a
    ``dataset/`` folder (``predict`` on every record)."""
    sources: list[Source] = []
    splits = list(splits)
    for raw in paths:
        if str(raw).startswith(("s3:/", "gs:/", "gcs:/")):  # also after typer's Path made s3:// into s3:/
            raise DataError(f"{raw}: training reads local folders, not buckets; copy the output folder first (e.g. "
                            "`aws s3 sync s3://bucket/out ./out` or `gcloud storage rsync -r gs://bucket/out ./out`)")
        path = Path(raw)
        folders = published_folders(path, splits, filtered) if published and path.is_dir() else None
        if path.is_file():
            if path.suffix != ".parquet":
                raise DataError(f"{path} is not a Parquet file: give record-schema shards, a stage folder or a "
                                "pipeline output folder")
            sources.append(Source("file", path))
        elif not path.is_dir():
            raise DataError(f"{path} does not exist")
        elif folders is not None:
            cfg = _run_config(path)
            sources += [Source("file", f, cfg) for folder in folders for f in sorted(folder.rglob("*.parquet"))]
        elif (path / "latest.json").is_file():
            try:
                final = Path(load_latest(path)["final_dir"])
            except (OutputNotFound, KeyError) as exc:
                raise DataError(f"{path / 'latest.json'} names no final stage ({exc}); pass a stage folder") from exc
            sources.append(Source("stage", final, _run_config(path)))
        elif committed_indices(path):
            sources.append(Source("stage", path))
        else:
            files = sorted(path.rglob("*.parquet"))
            if not files:
                raise DataError(f"{path} holds no Parquet records: give a pipeline output folder, a stage folder or "
                                "Parquet files")
            sources += [Source("file", f) for f in files]
    if not sources:
        raise DataError("no training input given (--data)")
    return sources


# --- selecting -------------------------------------------------------------------------------------------------------

def _assignment(source: Source, config: DataConfig) -> tuple[DatasetConfig, int]:
    """The D1/D2 rule for records that lack cot.split: the synthesis run's own, when its config is known."""
    run = source.run_config or {}
    if run.get("dataset") is not None:
        return DatasetConfig.model_validate(run["dataset"]), int((run.get("run") or {}).get("seed", config.run_seed))
    return config.dataset, config.run_seed


def training_split(record: dict[str, Any], source: Source, config: DataConfig) -> str | None:
    split = (record.get("cot") or {}).get("split")
    if split is None and config.assign_missing_splits:
        dataset_cfg, seed = _assignment(source, config)
        split = dataset_split(record, dataset_cfg, seed)
    return split


def select_records(sources: Iterable[Source], config: DataConfig, stats: DataStats) -> Iterator[dict[str, Any]]:
    """Records of the configured training splits, refusing any whose source split may not be trained on."""
    n = 0
    for source in sources:
        for record in source.records():
            stats.records_read += 1
            if record.get("status", STATUS_OK) != STATUS_OK:
                stats.skipped["status_not_ok"] += 1
                continue
            split = training_split(record, source, config)
            if split is None:
                stats.skipped["no_cot_split"] += 1
                continue
            if split not in config.splits:
                stats.skipped[f"split_{split}"] += 1
                continue
            if not is_training_record(record, config.dataset):
                raise DataError(
                    f"record {record.get('id')!r} is marked {split} but comes from the source split "
                    f"{record.get('split')!r}; only {config.dataset.training_splits} may be trained on "
                    f"({source.path}). Dev and test records must never enter training data: rebuild the input, or "
                    "set data.dataset.training_splits if this split is really a training split.")
            if config.require_grpo_keep and not (record.get("grpo") or {}).get("keep"):
                stats.skipped["grpo_not_kept"] += 1
                continue
            if config.limit is not None and n >= config.limit:
                stats.skipped["over_limit"] += 1
                continue
            n += 1
            yield record


def sources_for(paths: Iterable[str | Path], config: DataConfig) -> list[Source]:
    return resolve_sources(paths, config.splits, filtered=config.require_grpo_keep)


# --- examples --------------------------------------------------------------------------------------------------------

def geometry_fields(record: dict[str, Any], prompt: StudentPromptConfig) -> dict[str, float]:
    """The frame's extent and pixels per frame unit for a record's image (zeros when its size is unknown)."""
    size = student.image_size(record)
    if size is None:
        return {"extent_w": 0.0, "extent_h": 0.0, "px_per_unit_x": 0.0, "px_per_unit_y": 0.0}
    ex, ey = frame_extent(prompt.frame, *size)
    pw, ph = model_image_size(prompt.frame, *size) if prompt.image else size
    return {"extent_w": float(ex), "extent_h": float(ey), "px_per_unit_x": pw / ex, "px_per_unit_y": ph / ey}


def _chains(record: dict[str, Any], config: DataConfig) -> list[dict[str, Any]]:
    chains = [c for c in (record.get("cot") or {}).get("chains") or []
              if c.get("consistent") and (config.styles is None or c.get("style") in config.styles)]
    return chains[:config.max_chains_per_record] if config.max_chains_per_record else chains


def sft_examples(records: Iterable[dict[str, Any]], prompt: StudentPromptConfig, config: DataConfig,
                 stats: DataStats) -> Iterator[dict[str, Any]]:
    """One example per consistent chain: ``id``, ``record_id``, ``style``, ``messages`` (JSON), ``target`` (the
    assistant turn in the policy's frame) and the geometry GRBP needs."""
    for record in records:
        chains = _chains(record, config)
        if not chains:
            stats.skipped["no_consistent_chain"] += 1
            continue
        try:
            messages = json.dumps(student.build_messages(record, prompt), ensure_ascii=False)
            geometry = geometry_fields(record, prompt)
            targets = [student.target_turn(record, chain, prompt) for chain in chains]
        except (ValueError, FrameError) as exc:
            stats.error(f"{record.get('id')}: {exc}")
            continue
        stats.records_used += 1
        for i, (chain, target) in enumerate(zip(chains, targets)):
            stats.examples += 1
            yield {"id": f"{record['id']}#{i}", "record_id": record["id"], "style": chain.get("style") or "",
                   "messages": messages, "target": target, **geometry}


def grpo_rows(records: Iterable[dict[str, Any]], prompt: StudentPromptConfig, stats: DataStats
              ) -> Iterator[dict[str, Any]]:
    """One GRPO prompt per record: ``messages`` (JSON), ``gold`` (the answer in ORIGINAL pixels: the reward maps
    completions back before comparing) and the original image size."""
    for record in records:
        if record.get("grounding_labels") == GROUNDING_ABSENT:
            stats.skipped["grounding_absent"] += 1  # visibility unknown: the reward would punish a right answer
            continue
        try:
            messages = json.dumps(student.build_messages(record, prompt), ensure_ascii=False)
            gold = format_answer(gold_triples(record))
        except ValueError as exc:
            stats.error(f"{record.get('id')}: {exc}")
            continue
        size = student.image_size(record) or (0, 0)
        stats.records_used += 1
        stats.examples += 1
        yield {"id": record["id"], "messages": messages, "gold": gold, "width": int(size[0]), "height": int(size[1])}


def build_dataset(rows: Iterable[dict[str, Any]] | None = None, *, generator: Any = None,
                  gen_kwargs: dict[str, Any] | None = None, streaming: bool = False) -> Any:
    """A ``datasets.Dataset`` from rows, or an ``IterableDataset`` over a generator (``streaming``)."""
    import datasets

    if streaming:
        return datasets.IterableDataset.from_generator(generator, gen_kwargs=gen_kwargs or {})
    rows = list(rows if rows is not None else generator(**(gen_kwargs or {})))
    if not rows:
        raise DataError("no training example: check data.splits, that the records carry cot.split (or set "
                        "data.assign_missing_splits=true) and consistent chains")
    return datasets.Dataset.from_list(rows)


def _stream_sft(files: list[str], kinds: list[str], run_configs: list[str], prompt_json: str, data_json: str
                ) -> Iterator[dict[str, Any]]:
    """Generator for streaming SFT (module-level, JSON arguments and per-source lists of equal length, so that
    ``datasets`` can pickle it and shard the sources over dataloader workers)."""
    prompt = StudentPromptConfig.model_validate_json(prompt_json)
    config = DataConfig.model_validate_json(data_json)
    sources = [Source(kind, Path(f), json.loads(cfg)) for f, kind, cfg in zip(files, kinds, run_configs)]
    yield from sft_examples(select_records(sources, config, DataStats()), prompt, config, DataStats())


def sft_dataset(paths: Iterable[str | Path], prompt: StudentPromptConfig, config: DataConfig) -> tuple[Any, DataStats]:
    """The SFT examples as a ``datasets`` dataset (streamed when ``config.streaming``), with the reading stats
    (empty when streaming: they exist only once the stream has been read)."""
    sources = sources_for(paths, config)
    stats = DataStats()
    if config.streaming:
        kwargs = {"files": [str(s.path) for s in sources], "kinds": [s.kind for s in sources],
                  "run_configs": [json.dumps(s.run_config) for s in sources],
                  "prompt_json": prompt.model_dump_json(), "data_json": config.model_dump_json()}
        return build_dataset(generator=_stream_sft, gen_kwargs=kwargs, streaming=True), stats
    rows = list(sft_examples(select_records(sources, config, stats), prompt, config, stats))
    return build_dataset(rows), stats


def grpo_dataset(paths: Iterable[str | Path], prompt: StudentPromptConfig, config: DataConfig
                 ) -> tuple[Any, DataStats]:
    if config.streaming:
        raise DataError("GRPO reads its prompts into memory (TRL repeats each prompt G times): set "
                        "data.streaming=false")
    stats = DataStats()
    rows = list(grpo_rows(select_records(sources_for(paths, config), config, stats), prompt, stats))
    return build_dataset(rows), stats
