"""LoRA SFT on tiny random-weight Qwen2 / Qwen2-VL models built offline: labels, GRBP in the collator, loss, adapter,
checkpoints and resume, and predictions that eval reads."""

from __future__ import annotations

import hashlib
import json
import math
import shutil

import pytest

pytest.importorskip("trl")

import torch  # noqa: E402

from conftest import SFT_SMOKE  # noqa: E402
from gmner_pipeline.frames import FrameConfig  # noqa: E402
from gmner_pipeline.student import StudentPromptConfig, text_only  # noqa: E402
from gmner_pipeline.train.collate import IGNORE_INDEX, SFTCollator, render  # noqa: E402
from gmner_pipeline.train.config import DataConfig, load_train_config  # noqa: E402
from gmner_pipeline.train.data import sft_dataset  # noqa: E402
from gmner_pipeline.train.grbp import GRBPConfig  # noqa: E402
from gmner_pipeline.train.models import ModelSpec, load_policy, prompt_config_for  # noqa: E402
from support.train_records import ANSWER, THINK, toy_image, toy_record, write_stage  # noqa: E402

pytestmark = pytest.mark.integration
TARGET = f"<think>{THINK}</think><answer>{ANSWER}</answer>"


def _rows(tmp_path, prompt, n=2, image=None, size=(100, 80)):
    records = [toy_record(i, image=image, width=size[0], height=size[1]) for i in range(n)]
    stage = write_stage(tmp_path / "stage", records)
    ds, _ = sft_dataset([stage], prompt, DataConfig())
    return [ds[i] for i in range(len(ds))]


def test_labels_are_the_assistant_turn_token_by_token(tmp_path, tiny_qwen2):
    policy = load_policy(ModelSpec(name_or_path=str(tiny_qwen2)))
    prompt = prompt_config_for(policy, {})
    assert prompt.image is False  # a text model reads the detections and knowledge instead of the image
    rows = _rows(tmp_path, prompt)
    rows[1] = dict(rows[1], target="<think>short</think><answer>None</answer>")  # a shorter row: padding
    collator = SFTCollator(policy.processor, prompt, False, GRBPConfig(enabled=False))
    batch = collator(rows)
    tok = policy.tokenizer
    for row, ids, labels, mask in zip(rows, batch["input_ids"], batch["labels"], batch["attention_mask"]):
        prompt_text, completion = render(tok, text_only(json.loads(row["messages"])), row["target"])
        n_prompt = len(tok(prompt_text, add_special_tokens=False)["input_ids"])
        n_completion = len(tok(completion, add_special_tokens=False)["input_ids"])
        for i in range(len(ids)):  # token by token
            if i < n_prompt or i >= n_prompt + n_completion:
                assert labels[i] == IGNORE_INDEX
            else:
                assert labels[i] == ids[i]
        assert mask.sum() == n_prompt + n_completion
        trained = ids[labels != IGNORE_INDEX]
        assert tok.decode(trained) == row["target"] + "<|im_end|>\n"  # reasoning + answer + end of turn
        assert tok.decode(ids[:n_prompt]) == prompt_text and prompt_text.endswith("<|im_start|>assistant\n")
    assert batch["input_ids"][1, -1] == tok.pad_token_id


def test_multimodal_labels_skip_the_image_tokens(tmp_path, tiny_qwen2_vl):
    policy = load_policy(ModelSpec(name_or_path=str(tiny_qwen2_vl)))
    prompt = prompt_config_for(policy, {})
    assert prompt.image and prompt.frame.kind == "qwen2_vl"  # Qwen2-VL boxes are 0-1000
    rows = _rows(tmp_path, prompt, image=toy_image(tmp_path, 112, 84), size=(112, 84))
    assert "[89,60,446,833]" in rows[0]["target"]  # [10,5,50,70] of a 112x84 image in the 0-1000 frame
    batch = SFTCollator(policy.processor, prompt, True, GRBPConfig(enabled=False))(rows)
    image_token = policy.model.config.image_token_id
    ids, labels = batch["input_ids"], batch["labels"]
    assert (ids == image_token).sum() > 0
    assert (labels[ids == image_token] == IGNORE_INDEX).all()
    assert batch["pixel_values"].shape[0] > 0 and batch["image_grid_thw"].shape == (2, 3)
    assert batch["mm_token_type_ids"].shape == ids.shape
    decoded = policy.tokenizer.decode(ids[0][labels[0] != IGNORE_INDEX])
    assert decoded == rows[0]["target"] + "<|im_end|>\n"
    policy.model.eval()
    with torch.no_grad():
        assert math.isfinite(policy.model(**batch).loss.item())


def test_grbp_in_the_collator_is_fresh_per_epoch_and_leaves_rows_alone(tmp_path, tiny_qwen2):
    policy = load_policy(ModelSpec(name_or_path=str(tiny_qwen2)))
    prompt = StudentPromptConfig(image=False)
    rows = _rows(tmp_path, prompt)
    before = [dict(r) for r in rows]
    collator = SFTCollator(policy.processor, prompt, False, GRBPConfig(beta=0.3, gamma=0.3), seed=3)
    epoch0 = [collator.target(r) for r in rows]
    assert [collator.target(r) for r in rows] == epoch0  # same seed, epoch and example: same noise
    collator.epoch = 1
    epoch1 = [collator.target(r) for r in rows]
    assert epoch1 != epoch0 and all("[10,5,50,70]" not in t for t in epoch0 + epoch1)
    assert rows == before  # the dataset rows are never modified
    assert collator.stats.boxes == 6 and collator.stats.perturbed + collator.stats.kept_original == 6  # 3 calls x 2


def test_sft_loss_falls_checkpoints_carry_the_config_and_shards_are_untouched(trained_sft):
    result, out = trained_sft["result"], trained_sft["output"]
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert len(losses) == 16 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < 0.25 * sum(losses[:3]) / 3  # overfits two examples
    assert result.steps == 16 and result.data["examples"] == 2 and result.data["skipped"] == {"split_D2": 2}
    for folder in (out, out / "checkpoints" / "checkpoint-8", out / "checkpoints" / "checkpoint-16"):
        assert (folder / "gmner_train.yaml").is_file()
    info = json.loads((out / "adapter" / "gmner_policy.json").read_text())
    assert info["kind"] == "sft" and info["prompt"]["image"] is False
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["identity"] == result.identity and summary["extra"]["peak_rss_mib"] > 0
    stage = trained_sft["stage"]
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(stage.iterdir())} == \
        trained_sft["digest"]


def test_the_saved_adapter_reloads_to_the_same_policy(trained_sft, tiny_qwen2):
    from peft import PeftModel

    from gmner_pipeline import student
    from gmner_pipeline.train.sampler import LocalPolicySampler

    sampler = LocalPolicySampler(adapter=str(trained_sft["output"]))
    assert sampler.identity()["adapter_sha256"] == trained_sft["result"].identity
    inputs = sampler._inputs([student.build_messages(trained_sft["records"][0], sampler.prompt)])
    base = load_policy(ModelSpec(name_or_path=str(tiny_qwen2))).model.eval()
    with torch.no_grad():
        merged = sampler.policy.model(**inputs).logits
        base_logits = base(**inputs).logits
        unmerged = PeftModel.from_pretrained(base, str(trained_sft["output"] / "adapter")).eval()(**inputs).logits
    torch.testing.assert_close(merged, unmerged, atol=2e-3, rtol=1e-4)  # merged vs unmerged: float rounding only
    assert not torch.allclose(merged, base_logits, atol=1e-2)


def test_predict_writes_parseable_answers_that_eval_scores(trained_sft, tmp_path):
    from gmner_pipeline.scoring.evaluate import evaluate
    from gmner_pipeline.scoring.io import load_predictions, pair
    from gmner_pipeline.train.predict import predict
    from gmner_pipeline.train.sampler import LocalPolicySampler

    records = trained_sft["records"][:2]  # the records it was trained on: the loop, not generalisation, is tested
    sampler = LocalPolicySampler(adapter=str(trained_sft["output"]), batch_size=2)
    result = predict(sampler, records, tmp_path / "preds.jsonl", max_new_tokens=80)
    assert result.written == 2 and result.status == {"ok": 2}
    lines = [json.loads(x) for x in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert lines[0]["triples"] == [{"entity": "Alice Smith", "type": "PER", "boxes": [[10.0, 5.0, 50.0, 70.0]]},
                                   {"entity": "Paris", "type": "LOC", "boxes": None}]
    report = evaluate(pair(records, load_predictions([tmp_path / "preds.jsonl"])).samples).to_dict()
    assert report["mner"]["f1"] == 1.0 and report["gmner"]["f1"] == 1.0
    assert report["parse_status"] == {"ok": 2}


def test_resume_continues_from_the_last_checkpoint(trained_sft, tmp_path):
    from gmner_pipeline.train.sft import run_sft

    out = tmp_path / "sft"
    shutil.copytree(trained_sft["output"], out)
    config = trained_sft["config"].model_copy(update={"trainer": trained_sft["config"].trainer | {"max_steps": 18}})
    result = run_sft(config, [trained_sft["stage"]], out, resume="auto")
    steps = [h["step"] for h in result.log_history if "loss" in h]
    assert result.steps == 18 and steps[-2:] == [17, 18]
    assert min(steps) >= 1 and 16 in steps  # the resumed history, continued (not restarted from step 1 alone)


def test_multimodal_sft_trains_the_language_model_only(tmp_path, tiny_qwen2_vl):
    from safetensors import safe_open

    from gmner_pipeline.train.sft import run_sft

    image = toy_image(tmp_path, 112, 84)
    stage = write_stage(tmp_path / "stage", [toy_record(i, image=image, width=112, height=84) for i in range(2)])
    config = load_train_config("e2e_gmner_sft", SFT_SMOKE + ["trainer.max_steps=2", "trainer.save_strategy=no"],
                               **{"model.name_or_path": str(tiny_qwen2_vl)})
    result = run_sft(config, [stage], tmp_path / "sft")
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert result.extra["grbp"]["boxes"] > 0  # GRBP ran on the 0-1000 targets
    with safe_open(str(result.adapter / "adapter_model.safetensors"), "pt") as fh:
        keys = list(fh.keys())
    assert keys and not any("visual" in k for k in keys) and any("language_model" in k for k in keys)
    info = json.loads((result.adapter / "gmner_policy.json").read_text())
    assert info["prompt"]["frame"]["kind"] == "qwen2_vl" and info["multimodal"] is True
    assert FrameConfig.model_validate(info["prompt"]["frame"]).kind == "qwen2_vl"
