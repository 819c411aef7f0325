"""Where the G samples come from: the policy served over HTTP, or loaded in this worker.

* ``ServedPolicy`` (the production path): an OpenAI-compatible endpoint through the project's one LLM client, one
  request per record with ``n = G`` (the client tops up with seeded requests where a server ignores ``n``), top-k in
  the request's extra body. vLLM serves the SFT adapter with ``--enable-lora --lora-modules policy=DIR``.
* ``LocalPolicy`` (small and offline runs): ``train.sampler.LocalPolicySampler``, the trainer's own in-process
  sampler (base model + optional PEFT adapter chain, batched, seeded, CPU or GPU).

Both take the student's neutral messages (``student.build_messages``) and give back, per prompt, the texts that came
back and, when some did not, why. The prompt settings are the SFT run's (the adapter's ``gmner_policy.json``) with the
stage's ``prompt`` overrides on top, as ``train grpo`` builds them, so a group is sampled from the prompt GRPO uses.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from gmner_pipeline import student
from gmner_pipeline.llm.config import ImageConfig, LocalPolicyConfig
from gmner_pipeline.llm.request import LLMRequest, LLMResult
from gmner_pipeline.student import StudentPromptConfig

if TYPE_CHECKING:
    from gmner_pipeline.llm.client import LLMClient

Messages = list[dict[str, Any]]


@dataclass(frozen=True)
class Sampling:
    """CVO's sampling settings (MCR App. E.4), from the stage config."""

    n: int
    temperature: float
    top_k: int | None
    top_p: float | None
    max_tokens: int


@dataclass
class Samples:
    """One prompt's group: the texts that came back, and why any are missing."""

    texts: list[str]
    error: str | None = None
    error_kind: str | None = None
    results: list[LLMResult] = field(default_factory=list)  # served: for the lineage (tokens, latency, model)
    completion_tokens: int = 0  # local: generated tokens (served results carry their own)


def policy_prompt_info(adapter: str | None) -> dict[str, Any]:
    """The prompt settings an adapter was trained with (``gmner_policy.json``; empty without an adapter or file)."""
    if not adapter:
        return {}
    from gmner_pipeline.train.models import read_policy_info

    return dict(read_policy_info(adapter).get("prompt") or {})


class ServedPolicy:
    kind = "served"

    def __init__(self, client: LLMClient, prompt: StudentPromptConfig, sampling: Sampling,
                 images: ImageConfig | None = None):
        self.client = client
        self.prompt = prompt
        self.sampling = sampling
        self.images = images or ImageConfig()

    @classmethod
    def prompt_for(cls, adapter: str | None, overrides: dict[str, Any]) -> StudentPromptConfig:
        """The served policy's prompt: the adapter's training settings, then the stage's overrides."""
        return StudentPromptConfig.model_validate(policy_prompt_info(adapter) | overrides)

    def prepare(self, messages: Messages) -> Messages:
        """The chat messages sent for one prompt: the image inlined in the policy's frame (multimodal), or plain
        strings (text-only policies, as the trainer renders them). Raises ValueError for an unreadable image."""
        if self.prompt.image:
            return student.to_openai(messages, self.prompt, image_format=self.images.format,
                                     quality=self.images.quality)
        return student.text_only(messages)

    def request(self, chat: Messages, seed: int) -> LLMRequest:
        s = self.sampling
        return LLMRequest(messages=chat, n=s.n, seed=seed, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                          max_tokens=s.max_tokens)

    async def sample(self, prepared: Sequence[Messages], seeds: Sequence[int]) -> list[Samples]:
        results = await self.client.acomplete_many([self.request(m, seed) for m, seed in zip(prepared, seeds)])
        return [Samples(texts=res.texts[: self.sampling.n], error=res.error, error_kind=res.error_kind,
                        results=[res]) for res in results]


@dataclass(frozen=True)
class LocalOptions:
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 8


class LocalPolicy:
    kind = "local"

    def __init__(self, local: LocalPolicyConfig, options: LocalOptions, overrides: dict[str, Any],
                 sampling: Sampling):
        from pathlib import Path

        from gmner_pipeline.train.sampler import LocalPolicySampler

        # a local folder's "revision" is its content hash (identity only); hub names pass a real revision
        base: Any = local.base_model
        if local.revision and not Path(local.base_model).expanduser().exists():
            from gmner_pipeline.train.config import ModelSpec

            base = ModelSpec(name_or_path=local.base_model, revision=local.revision, dtype=options.dtype)
        self.sampler = LocalPolicySampler(base, local.adapter, device=options.device, dtype=options.dtype,
                                          prompt=policy_prompt_info(local.adapter) | overrides,
                                          batch_size=options.batch_size)
        self.prompt: StudentPromptConfig = self.sampler.prompt
        self.sampling = sampling

    def prepare(self, messages: Messages) -> Messages:
        return messages  # the sampler renders the chat template and loads images itself

    def _generate(self, prompts: Sequence[Messages], seed: int) -> list[list[str]]:
        s = self.sampling
        return self.sampler.sample(list(prompts), n=s.n, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                   max_new_tokens=s.max_tokens, seed=seed)

    def _tokens(self, text: str) -> int:
        return len(self.sampler.policy.tokenizer(text, add_special_tokens=False)["input_ids"])

    async def sample(self, prompts: Sequence[Messages], seeds: Sequence[int]) -> list[Samples]:
        """One seeded ``generate`` pass over the batch (seeded by its first prompt's seed), off the event loop. An
        exception propagates: the framework retries the batch record by record and records what still fails."""
        if not prompts:
            return []
        groups = await asyncio.to_thread(self._generate, prompts, seeds[0])
        return [Samples(texts=list(texts), completion_tokens=sum(self._tokens(t) for t in texts)) for texts in groups]
