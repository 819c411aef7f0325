"""The reward adapter inside a real TRL GRPOTrainer step (tiny random-weight GPT-2 and a word-level tokenizer built
offline: the test checks the reward plumbing, not the model)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_grpo_trainer_calls_the_reward_with_the_gold_column(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("trl")
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    from trl import GRPOConfig, GRPOTrainer

    from gmner_pipeline.answer import parse_answer
    from gmner_pipeline.scoring import gmner_reward, make_trl_reward

    words = ["<pad>", "<eos>", "Obama", "PER", "None", "|", ";", "<answer>", "</answer>", "Paris", "LOC", "Who", "?"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(words), n_positions=64, n_embd=16, n_layer=1, n_head=2,
                                       bos_token_id=1, eos_token_id=1, pad_token_id=0))
    data = Dataset.from_list([{"prompt": "Who ?", "gold": "Obama|PER|None"},
                              {"prompt": "Who ? Paris", "gold": "Paris|LOC|None"}] * 2)
    reward = make_trl_reward()
    seen = []

    def gmner_total(prompts, completions, **columns):  # the adapter, observed
        out = reward(prompts, completions, **columns)
        seen.append((list(completions), list(columns["gold"]), out))
        return out

    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=6, max_steps=1, logging_steps=1, report_to=[], use_cpu=True,
                      save_strategy="no")
    trainer = GRPOTrainer(model=model, reward_funcs=[gmner_total], args=args, train_dataset=data,
                          processing_class=tok)
    trainer.train()

    completions, golds, out = seen[0]
    assert sorted(golds) == ["Obama|PER|None"] * 2 + ["Paris|LOC|None"] * 2
    assert out == [gmner_reward(c, parse_answer(g).triples).total for c, g in zip(completions, golds)]  # same numbers
    logged = trainer.state.log_history[0]
    assert "rewards/gmner_total/mean" in logged and "gmner/unparsable" in logged and "gmner/span" in logged
    assert "gmner/format" in logged and "gmner/zeroed" in logged
