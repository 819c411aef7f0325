"""Training examples from published records, for other trainers' formats: the user turn from the one student prompt
builder (``student.build_messages``), the assistant turn from ``student.target_turn``, every box in the chosen frame.

An example is one consistent chain of a record (``chains="all"``, as the bundled SFT trainer uses them) or the
record's first consistent chain (``"first"``). Each carries the gold answer in the same frame (``answer``), which a
GRPO trainer's reward compares completions with.

Only training records reach an example: ``check_training`` refuses a record whose source split is not a training
split or that the published split does not select (a second guard behind ``publish``, which already refuses them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Literal

from .. import student
from ..frames import FrameConfig, FrameError
from ..publish import SELECTORS
from ..splits import DatasetConfig, is_training_record

FrameName = Literal["original", "qwen2_5_vl", "qwen2_vl"]
Chains = Literal["all", "first"]


class ExportRefused(ValueError):
    """A record that must never be exported into a training split (dev/test, or not in that split)."""


@dataclass
class Example:
    id: str
    record_id: str
    style: str
    messages: list[dict[str, Any]]  # neutral form (student.py): the user turn, and the system turn when configured
    target: str  # the assistant turn: <think>...</think><answer>...</answer>, boxes in the frame
    answer: str  # the gold answer, boxes in the frame
    image: str | None  # the original image file (absolute path), when the prompt shows the image
    width: int = 0
    height: int = 0


@dataclass
class ExportStats:
    records: int = 0
    examples: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def prompt_config(frame: FrameName = "original", text_only: bool = False) -> student.StudentPromptConfig:
    return student.StudentPromptConfig(image=not text_only, frame=FrameConfig(kind=frame))


def check_training(record: dict[str, Any], split: str, dataset: DatasetConfig) -> None:
    if not is_training_record(record, dataset):
        raise ExportRefused(f"record {record.get('id')!r} of source split {record.get('split')!r} is in the "
                            f"published {split}; only {dataset.training_splits} records may be exported as training "
                            "data (rerun the pipeline: publishing rebuilds the split)")
    if not SELECTORS[split](record):
        raise ExportRefused(f"record {record.get('id')!r} does not belong to {split} (cot.split "
                            f"{(record.get('cot') or {}).get('split')!r}, status {record.get('status')!r})")


def record_examples(record: dict[str, Any], split: str, prompt: student.StudentPromptConfig, chains: Chains,
                    dataset: DatasetConfig, stats: ExportStats) -> Iterator[Example]:
    check_training(record, split, dataset)
    consistent = [c for c in (record.get("cot") or {}).get("chains") or [] if c.get("consistent")]
    if chains == "first":
        consistent = consistent[:1]
    try:
        messages = student.build_messages(record, prompt)
        answer = student.target_answer(record, prompt)
        targets = [student.target_turn(record, c, prompt) for c in consistent]
    except (ValueError, FrameError) as exc:  # no image on disk for a multimodal prompt, an unusable image size
        stats.skip("prompt_error")
        stats.errors.append(f"{record.get('id')}: {exc}")
        return
    stats.records += 1
    image = next((p["path"] for m in messages if isinstance(m["content"], list) for p in m["content"]
                  if p["type"] == "image"), None)
    size = student.image_size(record) or (0, 0)
    for i, (chain, target) in enumerate(zip(consistent, targets)):
        stats.examples += 1
        yield Example(id=f"{record['id']}#{i}", record_id=record["id"], style=chain.get("style") or "",
                      messages=messages, target=target, answer=answer, image=image, width=size[0], height=size[1])


def examples(records: Iterable[dict[str, Any]], split: str, prompt: student.StudentPromptConfig, chains: Chains,
             dataset: DatasetConfig, stats: ExportStats) -> Iterator[Example]:
    for record in records:
        yield from record_examples(record, split, prompt, chains, dataset, stats)


def user_text(example: Example) -> tuple[str | None, str]:
    """(system text or None, the user turn's text) of an example."""
    system, text = None, ""
    for msg in example.messages:
        if msg["role"] == "system":
            system = msg["content"] if isinstance(msg["content"], str) else ""
        elif msg["role"] == "user":
            content = msg["content"]
            text = content if isinstance(content, str) else "\n".join(p["text"] for p in content
                                                                       if p["type"] == "text")
    return system, text
