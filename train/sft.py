"""LoRA SFT on D1 (MCR's MRSI; E2E-GMNER's SFT with GRBP), with TRL's ``SFTTrainer`` and PEFT.

    policy  = base model (+ processor)                      models.load_policy
    prompt  = student prompt settings for that policy        models.prompt_config_for
    dataset = one example per consistent D1 chain            data.sft_dataset
    batches = GRBP + chat template + assistant-only labels   collate.SFTCollator
    train   = trl.SFTTrainer(peft_config=LoraConfig(...))    the `trainer` / `lora` config sections
    output  = <output>/adapter, gmner_train.yaml, train_summary.json, checkpoints/
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Iterable

from .collate import SFTCollator
from .common import TrainResult, finish, lora_config, make_callbacks, resume_point, save_adapter, trainer_args
from .config import TrainConfig
from .data import sft_dataset
from .models import load_policy, prompt_config_for, require_train_extra

log = logging.getLogger(__name__)


def build_sft_trainer(config: TrainConfig, data: Iterable[str | Path], output: Path) -> tuple[Any, dict[str, Any]]:
    """The ready-to-train ``SFTTrainer`` and what the run needs afterwards (policy, prompt, collator, data stats)."""
    require_train_extra()
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    set_seed(config.seed)
    policy = load_policy(config.model)
    prompt = prompt_config_for(policy, config.prompt)
    dataset, stats = sft_dataset(data, prompt, config.data)
    if stats.error_count:
        log.warning("%d records could not be used (first: %s)", stats.error_count, stats.errors[0])
    log.info("SFT data: %s", stats.as_dict())
    args = trainer_args(SFTConfig, config, output, dataset_kwargs={"skip_prepare_dataset": True})
    collator = SFTCollator(policy.processor, prompt, policy.multimodal, config.grbp, config.seed, args.max_length)
    trainer = SFTTrainer(model=policy.model, args=args, train_dataset=dataset, processing_class=policy.processor,
                         data_collator=collator, peft_config=lora_config(config, policy),
                         callbacks=make_callbacks(config, collator))
    return trainer, {"policy": policy, "prompt": prompt, "collator": collator, "stats": stats}


def run_sft(config: TrainConfig, data: Iterable[str | Path], output: str | Path,
            resume: str | None = None) -> TrainResult:
    started = time.perf_counter()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    trainer, parts = build_sft_trainer(config, data, output)
    train_output = trainer.train(resume_from_checkpoint=resume_point(output, resume))
    adapter = save_adapter(trainer, output, config, parts["policy"], parts["prompt"], "sft", parents=[])
    collator = parts["collator"]
    grbp = {"boxes": collator.stats.boxes, "perturbed": collator.stats.perturbed,
            "kept_original": collator.stats.kept_original, "small": collator.stats.small}
    return finish(trainer, train_output, output, adapter, started, parts["stats"].as_dict(),
                  {"grbp": grbp, "truncated_examples": collator.truncated})
