"""GRPO from the SFT adapter: a step whose advantages follow the project's reward on a group with mixed rewards."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("trl")

import torch  # noqa: E402

from gmner_pipeline.train.config import load_train_config  # noqa: E402
from support.train_records import ANSWER  # noqa: E402

pytestmark = pytest.mark.integration
GRPO_SMOKE = ["trainer.per_device_train_batch_size=4", "trainer.gradient_accumulation_steps=1",
              "trainer.num_generations=4", "trainer.max_completion_length=48", "trainer.max_steps=1",
              "trainer.gradient_checkpointing=false", "trainer.save_strategy=no", "trainer.logging_steps=1",
              "trainer.learning_rate=0.01", "trainer.warmup_steps=0"]


def scripted_rollout(good: str, bad: str):
    """TRL's rollout hook, scripted: alternately the gold answer and a wrong one (the policy's own samples would
    all be noise at this size). Everything after it - rewards, advantages, the loss - is the real thing."""
    seen = {}

    def rollout(prompts, trainer):
        tok = trainer.processing_class
        prompt_ids, completion_ids = [], []
        for i, prompt in enumerate(prompts):
            prompt_ids.append(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                      return_dict=False))
            text = (good if i % 2 == 0 else bad) + "<|im_end|>"
            completion_ids.append(tok(text, add_special_tokens=False)["input_ids"])
        seen["prompts"] = len(prompts)
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}

    return rollout, seen


def test_grpo_step_advantages_follow_the_reward(trained_sft, tmp_path):
    from gmner_pipeline.train.common import save_adapter
    from gmner_pipeline.train.grpo import build_grpo_trainer
    from gmner_pipeline.train.models import adapter_chain

    config = load_train_config("mcr_grpo", GRPO_SMOKE)
    good = f"<think>ok</think><answer>{ANSWER}</answer>"
    bad = "<think>hmm</think><answer>Smith|ORG|None</answer>"
    rollout, seen = scripted_rollout(good, bad)
    out = tmp_path / "grpo"
    trainer, parts = build_grpo_trainer(config, [trained_sft["stage"]], trained_sft["output"], out,
                                        rollout_func=rollout)
    assert parts["stats"].examples == 2  # the two D2 records with grpo.keep
    captured = []
    original = trainer._generate_and_score_completions

    def spy(inputs):
        result = original(inputs)
        captured.append(result)
        return result

    trainer._generate_and_score_completions = spy
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    advantages = torch.cat([c["advantages"].flatten() for c in captured])
    assert seen["prompts"] == 4 and advantages.numel() == 4
    assert (advantages[0::2] > 0).all() and (advantages[1::2] < 0).all()  # gold answer up, wrong one down
    rewards = [h for h in trainer.state.log_history if "reward" in h][0]
    assert 0 < rewards["reward"] < 1 and rewards["reward_std"] > 0
    changed = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, lora[n])]
    assert changed  # the step moved the new LoRA
    # merge mode: the SFT adapter is folded into the base and kept inside the output as base_adapter/
    folder = save_adapter(trainer, out, config, parts["policy"], parts["prompt"], "grpo", parts["parents"])
    chain = adapter_chain(out)
    assert chain[0].name == "base_adapter" and chain[1] == folder
    assert json.loads((chain[0] / "gmner_policy.json").read_text())["kind"] == "sft"


def test_the_reward_scores_completions_in_original_pixels():
    from gmner_pipeline.frames import FrameConfig
    from gmner_pipeline.scoring.config import RewardConfig
    from gmner_pipeline.train.rewards import policy_reward

    frame = FrameConfig(kind="qwen2_vl")
    config = RewardConfig(types=("PER", "LOC"))
    reward = policy_reward(config, frame)
    in_frame = "<think>x</think><answer>Alice Smith|PER|[100,62,500,875]; Paris|LOC|None</answer>"  # 100x80, 0-1000
    in_pixels = f"<think>x</think><answer>{ANSWER}</answer>"
    got = reward(None, [in_frame, in_pixels], gold=[ANSWER, ANSWER], width=[100, 100], height=[80, 80])
    assert got[0] == pytest.approx(1.0)  # mapped back, it is the gold answer
    assert got[1] < 1.0  # pixel boxes read as 0-1000 coordinates land elsewhere
    plain = policy_reward(config, FrameConfig())
    assert plain(None, [in_pixels], gold=[ANSWER], width=[100], height=[80]) == [pytest.approx(1.0)]
