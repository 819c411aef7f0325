"""grpo_filter with an in-process policy (``llm.roles.policy.local``): the trainer's LocalPolicySampler loaded in the
worker, a tiny random Qwen2 with a random PEFT LoRA adapter, and the tiny policy SFT'd by the trainer's tests, which
answers its training records verbatim only when it is prompted exactly as it was trained."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("trl")

from gmner_pipeline.stages.grpo_filter import GrpoFilterStage  # noqa: E402
from gmner_pipeline.testing import run_stage  # noqa: E402
from support.grpo import d2_record  # noqa: E402
from support.train_records import ANSWER, THINK  # noqa: E402

pytestmark = pytest.mark.integration


def random_adapter(base: Path, folder: Path, seed: int = 0) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(folder)
    return folder


def local_llm(base: Path, adapter: Path | None, tmp_path: Path) -> dict:
    return {"roles": {"policy": {"local": {"base_model": str(base), "adapter": str(adapter) if adapter else None}}},
            "cache": {"path": str(tmp_path / "cache.sqlite")}}


def test_a_tiny_random_policy_with_a_lora_adapter_samples_in_process(tiny_qwen2, tmp_path):
    adapter = random_adapter(tiny_qwen2, tmp_path / "lora")
    records = [d2_record(f"#{i}") for i in range(3)] + [d2_record("d1", split="D1")]
    config = {"samples": 4, "max_tokens": 6, "local": {"device": "cpu", "batch_size": 2}}
    out = run_stage(GrpoFilterStage, records, config=config, llm=local_llm(tiny_qwen2, adapter, tmp_path))
    identity = out[0]["lineage"][-1]["model_ids"][0]
    assert identity.startswith(f"local:{tiny_qwen2}@") and "+adapter:" in identity
    for rec in out[:3]:
        g = rec["grpo"]
        assert rec["status"] == "ok" and len(g["responses"]) == 4 and all(isinstance(t, str) for t in g["responses"])
        assert g["rewards"] == [0.0] * 4 and g["reason"] == "low_std"  # random weights never write the format
        assert rec["lineage"][-1]["completion_tokens"] > 0
    assert out[3]["grpo"] is None and not out[3]["lineage"]  # D1: untouched
    again = run_stage(GrpoFilterStage, records, config=config, llm=local_llm(tiny_qwen2, adapter, tmp_path))
    assert [r["grpo"] for r in again] == [r["grpo"] for r in out]  # seeded per batch: the same groups
    other = random_adapter(tiny_qwen2, tmp_path / "lora2", seed=1)
    changed = run_stage(GrpoFilterStage, records[:1], config=config, llm=local_llm(tiny_qwen2, other, tmp_path))
    assert changed[0]["lineage"][-1]["model_ids"][0] != identity  # another adapter, another policy


def test_the_sft_policy_is_prompted_as_it_was_trained(trained_sft, tmp_path):
    """The adapter's gmner_policy.json gives the prompt settings; greedy answers of the SFT'd tiny policy are the
    trained answer, which scores 1 under the trainer's reward (so every group is constant: low_std)."""
    from gmner_pipeline.train.models import adapter_dir, read_policy_info

    adapter = adapter_dir(trained_sft["output"])
    base = read_policy_info(adapter)["base_model"]["name_or_path"]
    records = trained_sft["records"]  # two D1 records (not sampled) and two D2 records
    config = {"samples": 2, "temperature": 0.0, "max_tokens": 80, "local": {"device": "cpu"}}
    out = run_stage(GrpoFilterStage, records, config=config, llm=local_llm(Path(base), adapter, tmp_path))
    groups = [r["grpo"] for r in out if r["grpo"]]
    assert len(groups) == 2
    for g in groups:
        assert g["rewards"] == [1.0, 1.0] and g["responses"][0] == f"<think>{THINK}</think><answer>{ANSWER}</answer>"
        assert (g["keep"], g["reason"]) == (False, "low_std")
