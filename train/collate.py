"""The SFT collator: GRBP on the target, the chat template, tokens, and labels on the assistant turn only.

For each example: perturb the target's boxes (GRBP, fresh per epoch), render the conversation with the model's chat
template, and tokenise the prompt (with the image, through the processor, for multimodal policies) and the assistant
part separately, so that the boundary between them is exact. Labels are the assistant part's tokens (reasoning, answer
and the template's end-of-turn tokens, so the model learns to stop); everything before it, and padding, is -100.
Sequences longer than ``max_length`` are cut at the end (counted in ``truncated``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

from .. import student
from ..student import StudentPromptConfig
from .grbp import Geometry, GRBPConfig, GRBPStats, example_rng, perturb_turn

log = logging.getLogger(__name__)
IGNORE_INDEX = -100


class ChatTemplateError(ValueError):
    """The model's chat template does not render the assistant turn as given (e.g. it drops ``<think>``)."""


def render(processor: Any, messages: list[dict[str, Any]], target: str | None) -> tuple[str, str]:
    """(prompt text with the generation prompt, assistant part) as the chat template writes them."""
    prompt_text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if target is None:
        return prompt_text, ""
    full = processor.apply_chat_template(messages + [{"role": "assistant", "content": target}], tokenize=False)
    if not full.startswith(prompt_text) or target not in full[len(prompt_text):]:
        raise ChatTemplateError("the chat template does not write the assistant turn after the generation prompt "
                                "unchanged (some templates drop <think> blocks): give the model a template that "
                                "keeps the assistant text as it is")
    return prompt_text, full[len(prompt_text):]


def hf_messages(messages: list[dict[str, Any]], prompt: StudentPromptConfig, multimodal: bool
                ) -> tuple[list[dict[str, Any]], list[Any]]:
    """Neutral student messages -> (chat-template messages, images) for this policy."""
    if multimodal:
        return student.to_hf(messages, prompt)
    return student.text_only(messages), []


@dataclass
class SFTCollator:
    """Turns dataset rows (``data.sft_examples``) into a padded training batch."""

    processor: Any
    prompt: StudentPromptConfig
    multimodal: bool
    grbp: GRBPConfig = field(default_factory=GRBPConfig)
    seed: int = 0
    max_length: int | None = None
    epoch: int = 0  # set by GRBPEpochCallback before each epoch's batches are drawn
    stats: GRBPStats = field(default_factory=GRBPStats)
    truncated: int = 0

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    def target(self, row: dict[str, Any]) -> str:
        """The row's assistant turn with GRBP applied (a new string: the row is not modified)."""
        geometry = Geometry(row.get("extent_w") or 0.0, row.get("extent_h") or 0.0,
                            row.get("px_per_unit_x") or 0.0, row.get("px_per_unit_y") or 0.0)
        if not self.grbp.enabled or not geometry.valid:
            return row["target"]
        rng = example_rng(self.seed, self.epoch, row["id"])
        return perturb_turn(row["target"], rng, geometry, self.grbp, self.stats)

    def encode(self, row: dict[str, Any], target: str | None = None) -> dict[str, Any]:
        """One example's tensors (batch dimension 1) plus ``prompt_length``."""
        import torch

        target = self.target(row) if target is None else target
        messages, images = hf_messages(json.loads(row["messages"]), self.prompt, self.multimodal)
        prompt_text, completion_text = render(self.processor, messages, target)
        if self.multimodal:
            prompt = self.processor(text=[prompt_text], images=images or None, return_tensors="pt")
            prompt = dict(prompt)
        else:
            ids = self.tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
            prompt = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        completion = torch.tensor([self.tokenizer(completion_text, add_special_tokens=False)["input_ids"]])
        n_prompt = prompt["input_ids"].shape[1]
        out: dict[str, Any] = {"prompt_length": n_prompt}
        for key, value in prompt.items():
            if _per_token(value, n_prompt):
                extra = completion if key == "input_ids" else (
                    torch.ones_like(completion) if key == "attention_mask" else torch.zeros_like(completion))
                out[key] = torch.cat([value, extra.to(value.dtype)], dim=1)
            else:
                out[key] = value
        labels = out["input_ids"].clone()
        labels[:, :n_prompt] = IGNORE_INDEX
        out["labels"] = labels
        length = out["input_ids"].shape[1]
        if self.max_length is not None and length > self.max_length:
            self.truncated += 1
            for key in list(out):
                if key != "prompt_length" and _per_token(out[key], length):
                    out[key] = out[key][:, :self.max_length]
        return out

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return pad_batch([self.encode(row) for row in rows], self.tokenizer.pad_token_id)


def _per_token(value: Any, length: int) -> bool:
    return hasattr(value, "dim") and value.dim() == 2 and value.shape[0] == 1 and value.shape[1] == length


def pad_batch(examples: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Right-pad the per-token tensors (labels with -100, masks and type ids with 0); concatenate the rest (pixel
    values, image grids) along the first dimension."""
    import torch

    lengths = [ex["input_ids"].shape[1] for ex in examples]
    width = max(lengths)
    batch: dict[str, Any] = {}
    for key in examples[0]:
        if key == "prompt_length":
            continue
        values = [ex[key] for ex in examples]
        if all(_per_token(v, n) for v, n in zip(values, lengths)):
            fill = IGNORE_INDEX if key == "labels" else (pad_token_id if key == "input_ids" else 0)
            batch[key] = torch.cat([torch.nn.functional.pad(v, (0, width - v.shape[1]), value=fill)
                                    for v in values], dim=0)
        else:
            batch[key] = torch.cat(values, dim=0)
    return batch
