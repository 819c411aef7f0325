"""``predict``: generate with a policy, parse the answers, map the boxes back to original pixels, write JSONL for
``gmner-pipeline eval``.

Each output line is ``{"id", "triples": [{"entity", "type", "boxes"}], "status", "completion"}``: ``triples`` in
original pixels (what ``eval`` scores), ``status`` the parser's verdict (ok / partial / unparsable / empty; ``eval``
reports it as the parse rate) and ``completion`` the raw text in the policy's frame. Records whose prompt cannot be
built (a multimodal policy and no image on disk) get no line: they are counted, and ``eval`` scores them as missing.

Knowledge built from GOLD entities names the answer's spans, so a prompt that includes it on a dev/test record leaks
the answer: ``predict`` refuses such records unless ``allow_gold_knowledge`` (``--allow-gold-knowledge``) is set.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .. import student
from ..answer import Triple, parse_answer
from ..atomic import atomic_open
from ..frames import FrameConfig, boxes_from_frame
from ..schema import STATUS_OK
from ..splits import DatasetConfig, is_training_record
from ..student import StudentPromptConfig
from .data import DataError, resolve_sources

log = logging.getLogger(__name__)


class PredictError(ValueError):
    """The prediction input cannot be used as asked; the message says what to do."""


@dataclass
class PredictResult:
    out: Path
    written: int
    errors: list[str] = field(default_factory=list)
    status: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    identity: dict[str, Any] = field(default_factory=dict)

    @property
    def parse_rate(self) -> float:
        return self.status.get("ok", 0) / self.written if self.written else 0.0


def load_records(paths: Sequence[str | Path], split: str | None = None, limit: int | None = None,
                 image_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Records to predict on: a Twitter-GMNER folder (``split``, default test), a pipeline output folder (its final
    stage), a stage folder or Parquet record shards (``split`` then filters the records' source split)."""
    from ..scoring.io import is_twitter_gmner

    if len(paths) == 1 and is_twitter_gmner(Path(paths[0])):
        from ..ingest.twitter_gmner import read_twitter_gmner

        try:
            records = list(read_twitter_gmner(paths[0], split or "test", image_dir=image_dir, limit=None))
        except FileNotFoundError as exc:
            raise PredictError(f"{exc}; choose the split with --split") from exc
    else:
        try:
            sources = resolve_sources(paths, (), published=False)
        except DataError as exc:
            raise PredictError(str(exc)) from exc
        records = [r for s in sources for r in s.records() if split is None or r.get("split") == split]
    records = [r for r in records if r.get("status", STATUS_OK) == STATUS_OK]
    return records[:limit] if limit else records


def gold_knowledge_leaks(records: Iterable[dict[str, Any]], prompt: StudentPromptConfig,
                         dataset: DatasetConfig | None = None) -> list[str]:
    """Ids of eval-split records whose prompt would include knowledge built from their gold entities."""
    if not prompt.uses_knowledge():
        return []
    dataset = dataset or DatasetConfig()
    return [r["id"] for r in records if not is_training_record(r, dataset) and student.has_gold_knowledge(r)]


def check_gold_knowledge(records: Sequence[dict[str, Any]], prompt: StudentPromptConfig, allow: bool) -> None:
    leaks = gold_knowledge_leaks(records, prompt)
    if not leaks:
        return
    message = (f"{len(leaks)} dev/test records (first: {leaks[:3]}) carry knowledge built from their GOLD entities, "
               "and this policy's prompt includes knowledge: the prompt would name the answer's spans and the scores "
               "would be meaningless. Build the knowledge from a stage-1 model's predicted entities, or set "
               "--set prompt.knowledge=never, or pass --allow-gold-knowledge to run it anyway.")
    if not allow:
        raise PredictError(message)
    log.warning("--allow-gold-knowledge: %s", message)


def to_original(triples: Sequence[Triple], record: dict[str, Any], frame: FrameConfig) -> list[Triple]:
    size = student.image_size(record)
    if frame.kind == "original" or size is None:
        return list(triples)
    return [Triple(t.entity, t.type, boxes_from_frame(t.boxes, size[0], size[1], frame)) for t in triples]


def prediction_line(record: dict[str, Any], completion: str, prompt: StudentPromptConfig) -> dict[str, Any]:
    parsed = parse_answer(completion, types=prompt.types)
    triples = to_original(parsed.triples, record, prompt.frame)
    line = {"id": record["id"],
            "triples": [{"entity": t.entity, "type": t.type,
                         "boxes": None if t.boxes is None else [[round(v, 2) for v in b] for b in t.boxes]}
                        for t in triples],
            "status": parsed.status, "completion": completion}
    if parsed.errors:
        line["errors"] = parsed.errors[:5]
    return line


def predict(sampler: Any, records: Sequence[dict[str, Any]], out: str | Path, *, batch_size: int = 8,
            max_new_tokens: int = 512, allow_gold_knowledge: bool = False,
            progress: Callable[[int], None] | None = None) -> PredictResult:
    """Greedy predictions for ``records`` with ``sampler`` (a ``LocalPolicySampler``), written to ``out``."""
    started = time.perf_counter()
    prompt = sampler.prompt
    check_gold_knowledge(records, prompt, allow_gold_knowledge)
    result = PredictResult(Path(out), 0)
    ready: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    for record in records:
        try:
            ready.append((record, student.build_messages(record, prompt)))
        except ValueError as exc:
            result.errors.append(f"{record.get('id')}: {exc}")
    status: Counter = Counter()
    with atomic_open(out, "w", encoding="utf-8") as fh:
        for start in range(0, len(ready), batch_size):
            batch = ready[start:start + batch_size]
            texts = sampler.generate([m for _, m in batch], max_new_tokens=max_new_tokens)
            for (record, _), text in zip(batch, texts):
                line = prediction_line(record, text, prompt)
                status[line["status"]] += 1
                fh.write(json.dumps(line, ensure_ascii=False) + "\n")
                result.written += 1
            if progress is not None:
                progress(len(batch))
    result.status = dict(status)
    result.seconds = round(time.perf_counter() - started, 3)
    result.identity = sampler.identity()
    if result.errors:
        log.warning("%d records had no usable prompt (first: %s)", len(result.errors), result.errors[0])
    return result
