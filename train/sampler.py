"""An in-process sampler for a policy (base model + optional adapter chain): ``predict`` and the grpo_filter stage.

    sampler = LocalPolicySampler("Qwen/Qwen2.5-VL-7B-Instruct", adapter="runs/sft")
    texts = sampler.sample([student.build_messages(r, sampler.prompt) for r in records], n=8, temperature=1.5,
                           top_k=200, top_p=0.95, max_new_tokens=1024, seed=0)   # -> list (per prompt) of n texts

Prompts are the student's neutral messages (``student.build_messages``); images are resized for the policy's frame
(``student.to_hf``). Generation is batched (``batch_size`` prompts per call, ``n`` samples each), seeded per batch
(``seed`` + batch index, so a rerun with the same prompts, order, batch size and device gives the same texts), greedy
when ``temperature`` is 0. Adapters are merged into the weights once at load time. No Ray here: a stage wraps it.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from ..student import StudentPromptConfig
from .collate import hf_messages
from .config import ModelSpec
from .models import adapter_chain, adapter_dir, apply_adapters, load_policy, prompt_config_for, read_policy_info

log = logging.getLogger(__name__)
Messages = list[dict[str, Any]]


def pick_device(device: str) -> str:
    import torch

    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


class LocalPolicySampler:
    """A policy loaded in this process. ``prompt`` holds the student-prompt settings it expects (from the adapter's
    ``gmner_policy.json`` unless given)."""

    def __init__(self, base_model: str | ModelSpec | None = None, adapter: str | None = None, *,
                 device: str = "auto", dtype: str = "auto", prompt: StudentPromptConfig | dict[str, Any] | None = None,
                 batch_size: int = 8):
        info = read_policy_info(adapter) if adapter else {}
        if isinstance(base_model, ModelSpec):
            spec = base_model
        elif base_model:
            spec = ModelSpec(name_or_path=base_model, dtype=dtype)
        elif info.get("base_model"):
            spec = ModelSpec.model_validate(info["base_model"] | {"dtype": dtype})
        else:
            spec = ModelSpec(dtype=dtype)  # load_policy says a model is needed
        self.device = pick_device(device)
        self.policy = load_policy(spec)
        self.chain = adapter_chain(adapter) if adapter else []
        self.policy.model = apply_adapters(self.policy.model, self.chain).to(self.device).eval()
        if prompt is None:
            prompt = info.get("prompt")
        self.prompt = prompt_config_for(self.policy, prompt)
        self.batch_size = batch_size
        self._adapter = adapter

    @property
    def multimodal(self) -> bool:
        return self.policy.multimodal

    def identity(self) -> dict[str, Any]:
        """What determines this policy's outputs: the base model and the sha256 of each adapter folder."""
        from ..hashing import dir_sha256

        spec = self.policy.spec
        return {"base_model": spec.name_or_path, "gguf_file": spec.gguf_file, "revision": spec.revision,
                "adapter": str(adapter_dir(self._adapter)) if self._adapter else None,
                "adapter_sha256": dir_sha256(adapter_dir(self._adapter)) if self._adapter else None,
                "chain_sha256": [dir_sha256(p) for p in self.chain]}

    def _inputs(self, prompts: Sequence[Messages]) -> Any:
        from .collate import render

        texts, images = [], []
        for messages in prompts:
            hf, imgs = hf_messages(list(messages), self.prompt, self.multimodal)
            texts.append(render(self.policy.processor, hf, None)[0])
            images += imgs
        if self.multimodal:
            inputs = self.policy.processor(text=texts, images=images or None, return_tensors="pt", padding=True)
        else:
            inputs = self.policy.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return inputs.to(self.device)

    def sample(self, prompts: Sequence[Messages], n: int = 1, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, max_new_tokens: int = 512, seed: int = 0) -> list[list[str]]:
        """``n`` completions per prompt (greedy, so n identical ones, when ``temperature`` is 0)."""
        import torch
        from transformers import set_seed

        out: list[list[str]] = []
        greedy = temperature <= 0
        tokenizer = self.policy.tokenizer
        for b, start in enumerate(range(0, len(prompts), self.batch_size)):
            batch = prompts[start:start + self.batch_size]
            inputs = self._inputs(batch)
            kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id}
            if greedy:
                kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
            else:
                kwargs.update(do_sample=True, temperature=temperature, top_k=top_k or 0, top_p=top_p or 1.0,
                              num_return_sequences=n)
            set_seed(seed + b)
            with torch.inference_mode():
                generated = self.policy.model.generate(**inputs, **kwargs)
            texts = tokenizer.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            per = 1 if greedy else n
            for i in range(len(batch)):
                group = texts[i * per:(i + 1) * per]
                out.append(group * n if greedy else group)
        return out

    def generate(self, prompts: Sequence[Messages], max_new_tokens: int = 512) -> list[str]:
        """One greedy completion per prompt."""
        return [group[0] for group in self.sample(prompts, n=1, temperature=0.0, max_new_tokens=max_new_tokens)]
