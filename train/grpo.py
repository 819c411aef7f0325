"""GRPO on the filtered D2 (MCR's CVO), with TRL's ``GRPOTrainer`` and PEFT.

The policy is the base model plus the SFT adapter. With ``adapter_mode: merge`` (default, as ms-swift users do it) the
SFT adapter is merged into the weights and a fresh LoRA is trained on top, so the KL reference (TRL: the model with the
adapter disabled) is the SFT policy; the SFT adapter is stored inside the output as ``adapter/base_adapter``. With
``continue`` the SFT adapter itself keeps training and the reference is the base model.

The reward is the project's (``rewards.policy_reward``: completions mapped back to original pixels, then
``scoring.rewards``). G, temperature, top-k/top-p, ε_low/ε_high, β, the learning rate, warmup and the loss's length
normalisation (``loss_type: grpo``) are TRL ``GRPOConfig`` fields set by the preset (``configs/train/mcr_grpo.yaml``);
``trainer.use_vllm: true`` (+ ``vllm_mode``) generates with vLLM on GPU machines.
"""

from __future__ import annotations

import json
import logging
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable

from .. import student
from ..student import StudentPromptConfig
from .common import TrainResult, finish, lora_config, make_callbacks, resume_point, save_adapter, trainer_args
from .config import TrainConfig
from .data import grpo_dataset
from .models import ModelSpec, adapter_chain, apply_adapters, load_policy, prompt_config_for, read_policy_info, \
    require_train_extra
from .rewards import policy_reward

log = logging.getLogger(__name__)


def conversational_rows(batch: dict[str, list[Any]], prompt: StudentPromptConfig, multimodal: bool
                        ) -> dict[str, list[Any]]:
    """``datasets`` transform: the stored messages (JSON) -> TRL's conversational ``prompt`` (+ ``image``, the PIL
    image resized for the frame, loaded only when a batch is drawn)."""
    out = {k: v for k, v in batch.items() if k != "messages"}
    prompts, images = [], []
    for raw in batch["messages"]:
        messages = json.loads(raw)
        if multimodal:
            hf, imgs = student.to_hf(messages, prompt)
            prompts.append(hf)
            images.append(imgs[0] if imgs else None)
        else:
            prompts.append(student.text_only(messages))
    out["prompt"] = prompts
    if multimodal:
        out["image"] = images
    return out


def policy_spec(config: TrainConfig, info: dict[str, Any]) -> ModelSpec:
    if config.model.name_or_path:
        return config.model
    if info.get("base_model"):
        return ModelSpec.model_validate(info["base_model"])
    return config.model  # load_policy explains that a model is needed


def build_grpo_trainer(config: TrainConfig, data: Iterable[str | Path], adapter: str | Path, output: Path,
                       rollout_func: Callable[..., dict[str, Any]] | None = None) -> tuple[Any, dict[str, Any]]:
    """The ready-to-train ``GRPOTrainer``. ``rollout_func`` is TRL's hook for custom generation (tests use it to
    script completions)."""
    require_train_extra()
    from transformers import set_seed
    from trl import GRPOConfig, GRPOTrainer

    set_seed(config.seed)
    info = read_policy_info(adapter)
    policy = load_policy(policy_spec(config, info))
    prompt = prompt_config_for(policy, (info.get("prompt") or {}) | config.prompt)  # the SFT run's prompt by default
    chain = adapter_chain(adapter)
    if config.adapter_mode == "merge":
        model, peft_config, parents = apply_adapters(policy.model, chain), lora_config(config, policy), chain
    else:
        model, peft_config, parents = apply_adapters(policy.model, chain, trainable_last=True), None, chain[:-1]
    policy.model = model
    dataset, stats = grpo_dataset(data, prompt, config.data)
    log.info("GRPO data: %s", stats.as_dict())
    dataset = dataset.with_transform(partial(conversational_rows, prompt=prompt, multimodal=policy.multimodal))
    args = trainer_args(GRPOConfig, config, output)
    # the reward reads completions (and gold) with the label set the policy is prompted with
    reward = policy_reward(config.reward.model_copy(update={"types": tuple(prompt.types)}), prompt.frame)
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=dataset,
                          processing_class=policy.processor, peft_config=peft_config, rollout_func=rollout_func,
                          callbacks=make_callbacks(config))
    return trainer, {"policy": policy, "prompt": prompt, "stats": stats, "parents": parents}


def run_grpo(config: TrainConfig, data: Iterable[str | Path], adapter: str | Path, output: str | Path,
             resume: str | None = None) -> TrainResult:
    started = time.perf_counter()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    trainer, parts = build_grpo_trainer(config, data, adapter, output)
    train_output = trainer.train(resume_from_checkpoint=resume_point(output, resume))
    folder = save_adapter(trainer, output, config, parts["policy"], parts["prompt"], "grpo", parts["parents"])
    return finish(trainer, train_output, output, folder, started, parts["stats"].as_dict(),
                  {"adapter_mode": config.adapter_mode, "started_from": str(adapter)})
