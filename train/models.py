"""Loading a policy (base model + processor), its prompt settings, and chains of LoRA adapters.

A saved adapter folder (``<output>/adapter``) holds PEFT's files plus ``gmner_policy.json`` (the base model and the
student-prompt settings it was trained with: the frame, image on/off), so ``predict`` and the sampler need nothing but
the folder. A GRPO adapter trained on top of a merged SFT adapter carries that SFT adapter as ``base_adapter/``: the
chain is applied innermost first. The folder's ``dir_sha256`` is the policy's identity.

Heavy libraries (torch, transformers, peft) are imported inside the functions: the CLI starts without them.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..frames import FrameConfig
from ..hashing import dir_sha256
from ..student import StudentPromptConfig
from .config import ModelSpec

log = logging.getLogger(__name__)

POLICY_INFO = "gmner_policy.json"
BASE_ADAPTER = "base_adapter"
ADAPTER_SUBDIR = "adapter"
TRAIN_EXTRA_HINT = "install the trainer's dependencies: pip install 'gmner-pipeline[train]'"
# Model families whose boxes are not in original pixels (method-spec §Model coordinate frames).
FRAME_BY_MODEL_TYPE = {"qwen2_5_vl": "qwen2_5_vl", "qwen2_vl": "qwen2_vl"}


class TrainDependencyError(RuntimeError):
    """torch / transformers / peft / trl are missing."""


class PolicyError(ValueError):
    """A model, adapter or prompt setting that cannot work together; the message says what to change."""


def require_train_extra() -> None:
    missing = []
    for name in ("torch", "transformers", "peft", "trl", "accelerate"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise TrainDependencyError(f"{', '.join(missing)} not installed: {TRAIN_EXTRA_HINT}")


@dataclass
class Policy:
    model: Any
    processor: Any  # a tokenizer (text models) or a ProcessorMixin (multimodal)
    spec: ModelSpec
    multimodal: bool
    model_type: str

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)


def _load_kwargs(spec: ModelSpec) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    if spec.revision:
        kwargs["revision"] = spec.revision
    if spec.gguf_file:
        kwargs["gguf_file"] = spec.gguf_file
    return kwargs


def resolve_dtype(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def is_multimodal_config(config: Any) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES or hasattr(config, "vision_config")


def load_policy(spec: ModelSpec, device_map: Any = None) -> Policy:
    """The base model and its tokenizer / processor (pad token set, padding on the left for generation)."""
    require_train_extra()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, \
        AutoTokenizer

    spec = spec.resolved()
    if not spec.name_or_path:
        raise PolicyError("no model given: pass --model (a local folder, a hub name or a .gguf file)")
    kwargs = _load_kwargs(spec)
    try:
        config = AutoConfig.from_pretrained(spec.name_or_path, **kwargs)
    except (OSError, ValueError) as exc:
        raise PolicyError(f"cannot load the model config from {spec.name_or_path!r}: {exc}") from exc
    multimodal = is_multimodal_config(config)
    model_kwargs = dict(kwargs, dtype=resolve_dtype(spec.dtype))
    if spec.attn_implementation:
        model_kwargs["attn_implementation"] = spec.attn_implementation
    if device_map is not None:
        model_kwargs["device_map"] = device_map
    if multimodal:
        model = AutoModelForImageTextToText.from_pretrained(spec.name_or_path, **model_kwargs)
        processor = AutoProcessor.from_pretrained(spec.name_or_path, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(spec.name_or_path, **model_kwargs)
        processor = AutoTokenizer.from_pretrained(spec.name_or_path, **kwargs)
    quantizer = getattr(model, "hf_quantizer", None)
    if spec.gguf_file and quantizer is not None:
        # a GGUF checkpoint is dequantised at load (plain float weights), but transformers keeps its loader as the
        # model's "quantizer", which the Trainer refuses to train: drop the mark, through transformers' own call
        quantizer.remove_quantization_config(model)
    tokenizer = getattr(processor, "tokenizer", processor)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return Policy(model, processor, spec, multimodal, config.model_type)


def prompt_config_for(policy: Policy, overrides: dict[str, Any] | StudentPromptConfig | None = None
                      ) -> StudentPromptConfig:
    """The student prompt for this policy: ``overrides`` on top of the model's defaults (a multimodal model gets the
    image, in its family's frame; a text model gets the detections and knowledge instead)."""
    if isinstance(overrides, StudentPromptConfig):
        config = overrides
    else:
        data = dict(overrides or {})
        data.setdefault("image", policy.multimodal)
        if "frame" not in data and data["image"]:
            kind = FRAME_BY_MODEL_TYPE.get(policy.model_type)
            if kind is None:
                log.warning("no known box frame for %s models: boxes are written in original pixels (set "
                            "prompt.frame to change it)", policy.model_type)
            data["frame"] = FrameConfig(kind=kind or "original")
        config = StudentPromptConfig.model_validate(data)
    if config.image and not policy.multimodal:
        raise PolicyError(f"{policy.spec.name_or_path} is a text-only model and cannot take the image: set "
                          "prompt.image=false (it then reads the detections and knowledge instead)")
    configure_processor(policy, config.frame)
    return config


def configure_processor(policy: Policy, frame: FrameConfig) -> None:
    """A Qwen2.5-VL image processor resizes again with its own pixel budget: give it the frame's, so that an image
    already resized for the frame (``student.to_hf``) passes unchanged and the boxes stay in the frame. (Qwen2-VL's
    0-1000 frame does not depend on the resize, so its processor keeps its own settings.)"""
    image_processor = getattr(policy.processor, "image_processor", None)
    if image_processor is None or frame.kind != "qwen2_5_vl":
        return
    image_processor.size = {"shortest_edge": frame.min_pixels, "longest_edge": frame.max_pixels}
    for name, value in (("min_pixels", frame.min_pixels), ("max_pixels", frame.max_pixels)):
        if hasattr(image_processor, name):
            setattr(image_processor, name, value)


# --- adapters --------------------------------------------------------------------------------------------------------

def adapter_dir(path: str | Path) -> Path:
    """The adapter folder for ``path``: the folder itself, or a training output's ``adapter/``."""
    path = Path(path)
    for candidate in (path, path / ADAPTER_SUBDIR):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise PolicyError(f"{path} holds no LoRA adapter (adapter_config.json): give a `train sft`/`train grpo` output "
                      "folder or a PEFT adapter folder")


def adapter_chain(path: str | Path) -> list[Path]:
    """The adapters to apply for ``path``, innermost (applied first) to outermost."""
    folder = adapter_dir(path)
    parent = folder / BASE_ADAPTER
    return (adapter_chain(parent) if parent.is_dir() else []) + [folder]


def adapter_identity(path: str | Path) -> str:
    return dir_sha256(adapter_dir(path))


def read_policy_info(path: str | Path) -> dict[str, Any]:
    info = adapter_dir(path) / POLICY_INFO
    return json.loads(info.read_text(encoding="utf-8")) if info.is_file() else {}


def write_policy_info(folder: Path, spec: ModelSpec, prompt: StudentPromptConfig, kind: str,
                      multimodal: bool) -> None:
    payload = {"kind": kind, "base_model": spec.resolved().model_dump(mode="json"),
               "prompt": prompt.model_dump(mode="json"), "multimodal": multimodal}
    (folder / POLICY_INFO).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def copy_parent_chain(chain: list[Path], folder: Path) -> None:
    """Store ``chain`` (adapters merged under the one in ``folder``) as ``folder/base_adapter`` (nested)."""
    if not chain:
        return
    target = folder / BASE_ADAPTER
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(chain[-1], target, ignore=shutil.ignore_patterns(BASE_ADAPTER))
    copy_parent_chain(chain[:-1], target)


def apply_adapters(model: Any, chain: list[Path], trainable_last: bool = False) -> Any:
    """Merge each adapter of ``chain`` into the model in order; with ``trainable_last`` the last one stays a trainable
    PEFT adapter instead of being merged."""
    from peft import PeftModel

    for i, folder in enumerate(chain):
        last = i == len(chain) - 1
        if last and trainable_last:
            return PeftModel.from_pretrained(model, str(folder), is_trainable=True)
        model = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    return model
