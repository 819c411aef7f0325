"""The trainer's config: a preset YAML (``configs/train/*.yaml``) plus ``--set`` overrides, validated here.

Our own settings are typed models (``extra="forbid"``). The ``lora`` and ``trainer`` sections are passed through
untouched to ``peft.LoraConfig`` and ``trl.SFTConfig`` / ``trl.GRPOConfig``, so every option of those libraries is
available under its own name and documented by them; they check the keys when the run builds them.

The resolved config is saved beside the adapter (``gmner_train.yaml``) and in every checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from ..config import _explain, apply_overrides, expand_env
from ..configbase import ConfigError, Strict
from ..scoring.config import RewardConfig
from ..splits import D1, D2, DatasetConfig
from .grbp import GRBPConfig

CONFIG_FILE = "gmner_train.yaml"
# Set by the trainer itself; a preset or --set that sets them is refused with a pointer to the right option.
RESERVED_TRAINER_KEYS = {
    "output_dir": "use --output",
    "remove_unused_columns": "the collator needs every column",
    "dataset_kwargs": "the collator tokenises (GRBP runs there)",
}


class ModelSpec(Strict):
    """Where the base model comes from."""

    name_or_path: str | None = Field(None, description="local folder or hub name (a .gguf file path also works)")
    gguf_file: str | None = Field(None, description="GGUF file inside name_or_path (loaded dequantised)")
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on a GPU that supports it, else float32")
    trust_remote_code: bool = False
    attn_implementation: str | None = Field(None, description="e.g. sdpa or flash_attention_2 (transformers)")

    def resolved(self) -> "ModelSpec":
        """A path to a .gguf file becomes (its folder, gguf_file)."""
        if self.name_or_path and self.gguf_file is None and self.name_or_path.endswith(".gguf"):
            path = Path(self.name_or_path)
            if path.is_file():
                return self.model_copy(update={"name_or_path": str(path.parent), "gguf_file": path.name})
        return self


class DataConfig(Strict):
    """Which records and chains become training examples."""

    splits: list[Literal["D1", "D2"]] = Field(default_factory=lambda: [D1], description="cot.split values to use")
    require_grpo_keep: bool = Field(False, description="only records the GRPO filter kept (grpo.keep == true)")
    styles: list[str] | None = Field(None, description="chain styles to use (template, llm, mllm); None = all")
    max_chains_per_record: int | None = Field(None, ge=1, description="SFT: at most this many consistent chains "
                                              "per record (in stored order); None = every one")
    limit: int | None = Field(None, ge=1, description="use at most this many records (smoke runs)")
    streaming: bool = Field(False, description="stream examples (datasets.IterableDataset) instead of holding them "
                            "in memory; needs trainer.max_steps")
    assign_missing_splits: bool = Field(False, description="a training record without cot.split gets one from "
                                        "gmner_pipeline.splits (the run's dataset section when the input is an output "
                                        "folder with config.yaml, else data.dataset and data.run_seed)")
    dataset: DatasetConfig = Field(default_factory=DatasetConfig, description="allowed source splits and, for "
                                   "assign_missing_splits, the D1 fraction and seed")
    run_seed: int = Field(0, description="the synthesis run's seed, for assign_missing_splits on bare shards")


class TrainConfig(Strict):
    kind: Literal["sft", "grpo"]
    seed: int = Field(42, description="training seed (model init of LoRA, shuffling, GRBP, sampling)")
    model: ModelSpec = Field(default_factory=ModelSpec)
    prompt: dict[str, Any] = Field(default_factory=dict, description="StudentPromptConfig fields; image and frame "
                                   "default to the model (image for Qwen2-VL/2.5-VL, its frame)")
    data: DataConfig = Field(default_factory=DataConfig)
    grbp: GRBPConfig = Field(default_factory=GRBPConfig, description="SFT only")
    lora: dict[str, Any] = Field(default_factory=dict, description="peft.LoraConfig arguments")
    lora_vision: bool = Field(False, description="also put LoRA on the vision tower (default: language model only, "
                              "as ms-swift's freeze_vit)")
    adapter_mode: Literal["merge", "continue"] = Field(
        "merge", description="GRPO: 'merge' folds the SFT adapter into the base and trains a new LoRA (the KL "
        "reference is then the SFT policy); 'continue' trains the SFT adapter itself (the reference is the base)")
    reward: RewardConfig = Field(default_factory=RewardConfig, description="GRPO: the verifiable reward")
    trainer: dict[str, Any] = Field(default_factory=dict, description="trl.SFTConfig / trl.GRPOConfig arguments")

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        for key, why in RESERVED_TRAINER_KEYS.items():
            if key in self.trainer:
                raise ValueError(f"trainer.{key} is set by the trainer ({why})")
        if self.data.streaming and not self.trainer.get("max_steps"):
            raise ValueError("data.streaming needs trainer.max_steps (a stream has no length)")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def preset_path(name: str) -> Path:
    """A bundled preset (configs/train/<name>.yaml) or a YAML file path."""
    path = Path(name)
    if path.is_file():
        return path
    import gmner_pipeline.configs as pkg

    folder = Path(pkg.__file__).resolve().parent / "train"
    stem = name[:-5] if name.endswith(".yaml") else name
    candidate = folder / f"{stem}.yaml"
    if candidate.is_file():
        return candidate
    known = sorted(p.stem for p in folder.glob("*.yaml"))
    raise ConfigError(f"no train preset {name!r}: give a YAML file or one of {known}")


def load_train_config(preset: str | Path, overrides: list[str] | None = None, **fields: Any) -> TrainConfig:
    """Load a preset, apply ``--set`` overrides, then the command line's own options (``fields``: dotted keys such as
    ``model.name_or_path``), and validate."""
    path = preset_path(str(preset))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    data = apply_overrides(expand_env(data), list(overrides or []))
    for key, value in fields.items():
        if value is not None:
            node = data
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, path, TrainConfig, list(overrides or []))) from None


def save_config(config: TrainConfig, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
    path = Path(folder) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = config.model_dump(mode="json") | ({"run": extra} if extra else {})
    path.write_text(yaml.safe_dump(payload, sort_keys=False), encoding="utf-8")
    return path


__all__ = ["TrainConfig", "DataConfig", "ModelSpec", "load_train_config", "save_config", "preset_path", "D1", "D2",
           "CONFIG_FILE", "ConfigError"]
