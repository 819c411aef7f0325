"""What SFT and GRPO share: TRL/PEFT configs from ours, callbacks, checkpoints, saving the adapter, the summary."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..student import StudentPromptConfig
from .config import TrainConfig, save_config
from .models import ADAPTER_SUBDIR, Policy, adapter_identity, copy_parent_chain, write_policy_info

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"
SUMMARY = "train_summary.json"


@dataclass
class TrainResult:
    output: Path
    adapter: Path
    identity: str
    steps: int
    seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    log_history: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out["output"], out["adapter"] = str(self.output), str(self.adapter)
        return out


def lora_config(config: TrainConfig, policy: Policy) -> Any:
    """``peft.LoraConfig`` from the ``lora`` section (LoRA on every linear layer of the language model by default)."""
    from peft import LoraConfig

    kwargs: dict[str, Any] = {"task_type": "CAUSAL_LM", "target_modules": "all-linear"} | dict(config.lora)
    if policy.multimodal and not config.lora_vision and "exclude_modules" not in config.lora:
        kwargs["exclude_modules"] = r".*visual.*"  # the vision tower stays frozen (ms-swift's freeze_vit default)
    try:
        return LoraConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"lora: {exc} (the section holds peft.LoraConfig arguments)") from None


def trainer_args(cls: Any, config: TrainConfig, output: Path, **fixed: Any) -> Any:
    """A TRL config (``SFTConfig`` / ``GRPOConfig``) from the ``trainer`` section, with what the trainer owns."""
    import torch

    kwargs = dict(config.trainer)
    for key, value in kwargs.items():
        if key.endswith("_strategy") and value is False:
            kwargs[key] = "no"  # YAML 1.1 reads a bare `no` (save_strategy: no) as false
    _coerce_numbers(cls, kwargs)
    names = {f.name for f in dataclasses.fields(cls)}
    if "activation_checkpointing" in names and "gradient_checkpointing" in kwargs:
        # transformers 5 renamed it; TRL's default still sets the old name (the new one silences the warning)
        kwargs.setdefault("activation_checkpointing", kwargs.pop("gradient_checkpointing"))
    if "activation_checkpointing" in names:
        kwargs.setdefault("activation_checkpointing", True)
    kwargs.setdefault("seed", config.seed)
    if "bf16" not in kwargs and "fp16" not in kwargs:
        kwargs["bf16"] = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    kwargs.setdefault("dataloader_pin_memory", torch.cuda.is_available())  # pinning is for GPU copies only
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        kwargs.setdefault("use_cpu", True)  # several CPU processes (torchrun, accelerate launch): gloo, not NCCL
    kwargs.update(output_dir=str(output / CHECKPOINTS), remove_unused_columns=False, **fixed)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"trainer: {exc} (the section holds trl.{cls.__name__} arguments)") from None


def _coerce_numbers(cls: Any, kwargs: dict[str, Any]) -> None:
    """YAML 1.1 reads ``5e-3`` (no dot) as a string: turn such strings into the number a float/int field expects."""
    for f in dataclasses.fields(cls):
        value = kwargs.get(f.name)
        if not isinstance(value, str):
            continue
        kind = str(f.type)
        try:
            if "float" in kind:
                kwargs[f.name] = float(value)
            elif kind.startswith("int"):
                kwargs[f.name] = int(value)
        except ValueError:
            continue


def resume_point(output: Path, resume: str | None) -> str | None:
    """``auto``: the last checkpoint under ``<output>/checkpoints`` (None when there is none); a path: that one."""
    if resume is None:
        return None
    if resume != "auto":
        if not Path(resume).is_dir():
            raise ConfigError(f"--resume {resume}: no such checkpoint folder")
        return resume
    from transformers.trainer_utils import get_last_checkpoint

    folder = output / CHECKPOINTS
    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def make_callbacks(config: TrainConfig, collator: Any = None) -> list[Any]:
    from transformers import TrainerCallback

    class GRBPEpochCallback(TrainerCallback):
        """Tells the collator which epoch starts, before its batches are drawn: fresh GRBP noise per epoch."""

        def on_epoch_begin(self, args, state, control, **kwargs):  # noqa: ANN001 - TrainerCallback signature
            collator.epoch = math.floor((state.epoch or 0.0) + 1e-6)

    class SaveConfigCallback(TrainerCallback):
        """Every checkpoint carries the resolved config it was trained with."""

        def on_save(self, args, state, control, **kwargs):  # noqa: ANN001
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and folder.is_dir():
                save_config(config, folder)

    callbacks: list[Any] = [SaveConfigCallback()]
    if collator is not None:
        callbacks.append(GRBPEpochCallback())
    return callbacks


def save_adapter(trainer: Any, output: Path, config: TrainConfig, policy: Policy, prompt: StudentPromptConfig,
                 kind: str, parents: list[Path]) -> Path:
    """Write ``<output>/adapter`` (PEFT files, ``gmner_policy.json``, the merged parents as ``base_adapter/``) and the
    resolved config, on the main process only."""
    folder = output / ADAPTER_SUBDIR
    if trainer.is_world_process_zero():
        if folder.exists():
            shutil.rmtree(folder)
        trainer.model.save_pretrained(str(folder))
        write_policy_info(folder, policy.spec, prompt, kind, policy.multimodal)
        copy_parent_chain(parents, folder)
        save_config(config, output)
    trainer.accelerator.wait_for_everyone()
    return folder


def peak_memory() -> dict[str, float]:
    """Peak resident memory of this process (and peak CUDA memory when on a GPU), in MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"peak_rss_mib": rss / 1024 if sys.platform != "darwin" else rss / 2**20}
    try:
        import torch

        if torch.cuda.is_available():
            out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    except ImportError:  # pragma: no cover
        pass
    return out


def finish(trainer: Any, train_output: Any, output: Path, adapter: Path, started: float, data: dict[str, Any],
           extra: dict[str, Any]) -> TrainResult:
    result = TrainResult(output=output, adapter=adapter, identity=adapter_identity(adapter),
                         steps=int(trainer.state.global_step), seconds=round(time.perf_counter() - started, 3),
                         metrics=dict(train_output.metrics), data=data,
                         extra=extra | peak_memory() | {"processes": trainer.accelerator.num_processes},
                         log_history=list(trainer.state.log_history))
    if trainer.is_world_process_zero():
        (output / SUMMARY).write_text(json.dumps(result.summary(), indent=2, default=str) + "\n", encoding="utf-8")
    return result
