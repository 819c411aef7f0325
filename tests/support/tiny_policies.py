"""Tiny random-weight policies built offline: a Qwen2 (text) and a Qwen2-VL (image + text), for tests and smoke runs.

Nothing is downloaded. The tokenizer is a byte-level BPE trained here on the student prompt and the answer format
(so prompts are a few hundred tokens, not thousands), with Qwen's special tokens and a ChatML chat template that
places images where Qwen-VL does. The models' answers are noise until trained; a few steps of SFT on a handful of
records make them write the format (the tests rely on that). Never use them to produce data.

    python tests/support/tiny_policies.py OUT_DIR     # writes OUT_DIR/qwen2 and OUT_DIR/qwen2-vl
"""

from __future__ import annotations

import sys
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _corpus() -> list[str]:
    import gmner_pipeline
    from gmner_pipeline.prompts import load_text

    template = load_text("student/gmner.txt")
    lines = [template] * 20
    lines += ["<think>The tweet mentions Alice Smith, a person, who is visible.</think>"
              "<answer>Alice Smith|PER|[10,5,50,70]; Paris|LOC|None</answer>"] * 20
    lines += [" ".join(str(i) for i in range(1000)), "[0,0,0,0] [12,34,56,78] ; | None PER LOC ORG OTHER"]
    for name in ("distill/template/common.yaml", "distill/template/entity_first.yaml",
                 "distill/template/constraint_first.yaml"):
        try:
            lines += [load_text(name)] * 5  # the template chains' phrases, so the tests' targets stay short
        except FileNotFoundError:
            continue
    sample = Path(gmner_pipeline.__file__).resolve().parent / "sample" / "txt" / "train.txt"
    if sample.is_file():
        lines += [" ".join(ln.split("\t")[0] for ln in sample.read_text(encoding="utf-8").splitlines())] * 5
    return lines


def build_tokenizer(vocab_size: int = 3000):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   model_max_length=4096)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _text_config(tokenizer, hidden: int, layers: int) -> dict:
    return dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"), bos_token_id=None,
                # embeddings large enough that LoRA alone can make the output peaked (with the usual 0.02, the
                # tied output layer caps every logit near 0 and a few SFT steps cannot teach the format)
                initializer_range=0.3)


def build_tiny_qwen2(out: str | Path, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """A random Qwen2ForCausalLM with the tiny tokenizer, saved to ``out``."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out = Path(out)
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    config = Qwen2Config(**_text_config(tokenizer, hidden, layers), tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_tiny_qwen2_vl(out: str | Path, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """A random Qwen2VLForConditionalGeneration (one vision block) with a Qwen2-VL processor, saved to ``out``."""
    import torch
    from transformers import GenerationConfig, Qwen2VLConfig, Qwen2VLForConditionalGeneration, \
        Qwen2VLImageProcessor, Qwen2VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    out = Path(out)
    tokenizer = build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = hidden // 4
    quarter = head_dim // 2 // 4  # mrope sections (temporal, height, width) must sum to head_dim / 2
    text = _text_config(tokenizer, hidden, layers)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0,
                               "mrope_section": [head_dim // 2 - 2 * quarter, quarter, quarter]}
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=dict(depth=1, embed_dim=32, hidden_size=hidden, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(eos_token_id=text["eos_token_id"], pad_token_id=text["pad_token_id"])
    # a small pixel budget keeps the image to a few dozen tokens
    image_processor = Qwen2VLImageProcessor(size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112})
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


if __name__ == "__main__":  # pragma: no cover - manual helper
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-policies")
    print(build_tiny_qwen2(root / "qwen2"))
    print(build_tiny_qwen2_vl(root / "qwen2-vl"))
