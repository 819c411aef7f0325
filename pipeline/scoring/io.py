"""Reading gold data and predictions for ``gmner-pipeline eval``.

Gold: a Twitter-GMNER folder (``txt/<split>.txt`` + ``xml/``, read with the project's ingest), or Parquet shards with
the record schema (files, or folders searched recursively for ``*.parquet``).

Predictions: Parquet shards (each record's ``entities`` are the predictions, or with ``pred_field="cot"`` the answer
of its first CoT chain), or JSONL files with one object per line:

    {"id": "<record id or sample key>", "answer": "<E2E-GMNER answer string or a whole <think>/<answer> turn>"}
    {"id": "...", "triples": [{"entity": "Obama", "type": "PER", "boxes": [[x1, y1, x2, y2]]},
                              {"entity": "Paris", "type": "LOC", "boxes": null}], "status": "ok"}

(``status``, optional with ``triples``: the producer's parse verdict, ok / partial / unparsable / empty, reported as the
parse status; ``gmner-pipeline predict`` writes it.)

``completion``, ``response`` or ``text`` are accepted in place of ``answer``. A bad line is reported and skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Iterable, Literal

from ..answer import PARSE_STATUSES, Triple, gold_triples, parse_answer, triple_from_obj
from ..schema import GROUNDING_ABSENT, STATUS_OK
from .evaluate import Sample

ANSWER_KEYS = ("answer", "completion", "response", "text")


class EvalInputError(ValueError):
    """The gold or prediction input cannot be used; the message says what to do."""


@dataclass
class Prediction:
    triples: list[Triple]
    status: str = "ok"
    errors: list[str] = field(default_factory=list)


@dataclass
class Predictions:
    by_id: dict[str, Prediction] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # unreadable lines / records, duplicated ids
    duplicates: int = 0


def parquet_files(paths: Iterable[Path]) -> list[Path]:
    """Shard files under the given files/folders. A run's output folder (with ``latest.json``) means its final
    stage's shards, not every stage's; in a stage folder (with its ``_stage.json``) only committed shards count (a file
    without its commit marker is being written, or was voided by the runner)."""
    from ..shards import MANIFEST, committed_shards, is_committed, shard_index

    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir() and (p / "latest.json").is_file():
            from ..latest import OutputNotFound, load_latest

            try:
                p = Path(load_latest(p)["final_dir"])
            except (OutputNotFound, KeyError) as exc:
                raise EvalInputError(f"{p / 'latest.json'} has no final_dir ({exc}); pass a stage folder") from exc
        if p.is_dir():
            if (p / MANIFEST).is_file():
                files += committed_shards(p)
                continue
            for found in sorted(p.rglob("*.parquet")):
                in_stage_dir = (found.parent / MANIFEST).is_file()
                if not in_stage_dir or is_committed(found.parent, shard_index(found)):
                    files.append(found)
        elif p.is_file():
            files.append(p)
        else:
            raise EvalInputError(f"{p} does not exist")
    return files


def read_records(files: Iterable[Path]) -> list[dict[str, Any]]:
    from ..shards import read_records as read_shard

    out: list[dict[str, Any]] = []
    where: dict[str, Path] = {}
    for f in files:
        try:
            records = read_shard(f)
        except Exception as exc:
            raise EvalInputError(f"cannot read {f} as a record shard: {exc}") from exc
        for rec in records:
            if rec["id"] in where:
                raise EvalInputError(f"record {rec['id']!r} is in both {where[rec['id']]} and {f}: pass the shards of "
                                     "ONE stage (e.g. <output_dir>/<stage>/<key>, or the run's output folder)")
            where[rec["id"]] = f
        out += records
    return out


def is_twitter_gmner(path: Path) -> bool:
    return path.is_dir() and (path / "txt").is_dir()


def load_gold(paths: list[Path], split: str = "test") -> list[dict[str, Any]]:
    """Gold records from a Twitter-GMNER folder or record shards."""
    if len(paths) == 1 and is_twitter_gmner(Path(paths[0])):
        from ..ingest.twitter_gmner import read_twitter_gmner

        try:
            return list(read_twitter_gmner(paths[0], split))
        except FileNotFoundError as exc:
            raise EvalInputError(f"{exc}; choose the split with --split") from exc
    files = parquet_files(paths)
    if not files:
        raise EvalInputError(f"no gold found in {', '.join(map(str, paths))}: give a Twitter-GMNER folder (with txt/ "
                             "and xml/) or Parquet record shards")
    return read_records(files)


def load_predictions(paths: list[Path], pred_field: Literal["entities", "cot"] = "entities",
                     types: Collection[str] | None = None) -> Predictions:
    preds = Predictions()
    for path in paths:
        path = Path(path)
        if path.is_file() and path.suffix in (".jsonl", ".json", ".ndjson"):
            _read_jsonl(path, preds, types)
        else:
            for rec in read_records(parquet_files([path])):
                _add(preds, rec["id"], _from_record(rec, pred_field, types))
    return preds


def _add(preds: Predictions, key: str, pred: Prediction) -> None:
    if key in preds.by_id:
        preds.duplicates += 1
        preds.problems.append(f"prediction id {key!r} given more than once: the last one is used")
    preds.by_id[key] = pred


def _read_jsonl(path: Path, preds: Predictions, types: Collection[str] | None) -> None:
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                preds.problems.append(f"{where}: not JSON ({exc.msg})")
                continue
            except (ValueError, RecursionError) as exc:  # an integer beyond Python's digit limit, nesting too deep
                preds.problems.append(f"{where}: unreadable JSON ({type(exc).__name__}: {str(exc)[:120]})")
                continue
            if not isinstance(obj, dict) or "id" not in obj:
                preds.problems.append(f"{where}: expected an object with an 'id'")
                continue
            pred = _from_object(obj, where, types)
            if "triples" in obj:  # a triple that cannot be used (e.g. a non-finite coordinate) is reported, and skipped
                preds.problems.extend(pred.errors)
            _add(preds, str(obj["id"]), pred)


def _from_object(obj: dict[str, Any], where: str, types: Collection[str] | None) -> Prediction:
    if "triples" in obj:
        if not isinstance(obj["triples"], list):
            return Prediction([], "unparsable", [f"{where}: 'triples' must be a list"])
        triples, errors = [], []
        for item in obj["triples"]:
            t, err = triple_from_obj(item, {x.lower(): x for x in types} if types else None)
            if t is None:
                errors.append(f"{where}: {err}")
            else:
                triples.append(t)
        status = "ok" if not errors else ("partial" if triples else "unparsable")
        if not errors and obj.get("status") in PARSE_STATUSES:  # the producer's parse verdict (``predict`` writes it)
            status = obj["status"]
        return Prediction(triples, status, errors)
    key = next((k for k in ANSWER_KEYS if k in obj), None)
    if key is None:
        return Prediction([], "empty", [f"{where}: no 'answer' or 'triples'"])
    parsed = parse_answer(obj[key], types=types)
    return Prediction(parsed.triples, parsed.status, [f"{where}: {e}" for e in parsed.errors])


def _from_record(rec: dict[str, Any], pred_field: str, types: Collection[str] | None) -> Prediction:
    if pred_field == "entities":
        try:
            return Prediction(gold_triples(rec))
        except ValueError as exc:  # a box that is not four finite numbers
            return Prediction([], "unparsable", [f"{rec['id']}: {exc}"])
    chains = (rec.get("cot") or {}).get("chains") or []
    if not chains:
        return Prediction([], "empty", [f"{rec['id']}: no CoT chain"])
    parsed = parse_answer(chains[0].get("answer") or chains[0].get("text"), types=types)
    return Prediction(parsed.triples, parsed.status, parsed.errors)


@dataclass
class Pairing:
    samples: list[Sample]
    missing: list[str]  # gold ids without a prediction
    unknown: list[str]  # prediction ids matching no gold record
    skipped_gold: int  # gold records not scored (status not ok)


def pair(gold: list[dict[str, Any]], preds: Predictions, missing: Literal["empty", "error"] = "empty") -> Pairing:
    """Pair gold records with predictions by record id, or by sample key (e.g. the IMGID) when ids differ."""
    samples: list[Sample] = []
    missing_ids: list[str] = []
    used: set[str] = set()
    skipped = 0
    for rec in gold:
        if rec.get("status", STATUS_OK) != STATUS_OK:
            skipped += 1
            continue
        try:
            gold_of_rec = gold_triples(rec)
        except ValueError:  # a gold box that is not four finite numbers: the record is not scored (counted)
            skipped += 1
            continue
        key = next((k for k in (rec["id"], rec.get("sample_key")) if k is not None and k in preds.by_id), None)
        if key is None:
            missing_ids.append(rec["id"])
            pred = Prediction([], "missing")
        else:
            used.add(key)
            pred = preds.by_id[key]
        samples.append(Sample(id=rec["id"], gold=gold_of_rec, pred=pred.triples, tokens=rec.get("tokens"),
                              grounded=rec.get("grounding_labels") != GROUNDING_ABSENT, parse_status=pred.status))
    if missing_ids and missing == "error":
        raise EvalInputError(f"{len(missing_ids)} gold records have no prediction (first: {missing_ids[:3]}); "
                             "pass --missing empty to score them as predicting nothing")
    unknown = [k for k in preds.by_id if k not in used]
    return Pairing(samples, missing_ids, unknown, skipped)
