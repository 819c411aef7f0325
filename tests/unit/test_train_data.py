"""Training data: inputs, D1/D2 selection, the refusal of dev/test records, SFT examples and GRPO rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from gmner_pipeline.frames import FrameConfig
from gmner_pipeline.shards import write_records
from gmner_pipeline.splits import DatasetConfig, dataset_split
from gmner_pipeline.student import StudentPromptConfig
from gmner_pipeline.train.config import DataConfig, load_train_config
from gmner_pipeline.train.data import DataError, DataStats, grpo_dataset, resolve_sources, select_records, \
    sft_dataset, sft_examples
from support.train_records import ANSWER, toy_image, toy_record, write_stage

TEXT = StudentPromptConfig(image=False)


def _ids(records):
    return [r["id"] for r in records]


def test_selects_records_by_cot_split_and_skips_the_rest(tmp_path):
    records = [toy_record(0, cot_split="D1"), toy_record(1, cot_split="D2"), toy_record(2, cot_split=None),
               toy_record(3, cot_split="D1", status="error", error="bad"),
               toy_record(4, cot_split="D2", grpo={"keep": True}), toy_record(5, cot_split="D2", grpo={"keep": False})]
    stage = write_stage(tmp_path / "stage", records)
    stats = DataStats()
    d1 = list(select_records(resolve_sources([stage], ["D1"]), DataConfig(splits=["D1"]), stats))
    assert _ids(d1) == ["toy/train/0"]
    assert stats.skipped == {"split_D2": 3, "no_cot_split": 1, "status_not_ok": 1}
    kept = list(select_records(resolve_sources([stage], ["D2"]),
                               DataConfig(splits=["D2"], require_grpo_keep=True), DataStats()))
    assert _ids(kept) == ["toy/train/4"]


@pytest.mark.parametrize("split", ["dev", "test"])
def test_dev_and_test_records_never_enter_training_data(tmp_path, split):
    records = [toy_record(0), toy_record(1, split=split, cot_split="D1")]
    stage = write_stage(tmp_path / "stage", records)
    with pytest.raises(DataError, match=f"source split '{split}'"):
        sft_dataset([stage], TEXT, DataConfig())
    # nor through assign_missing_splits: a dev/test record never gets a D1/D2 split at all
    records = [toy_record(0, cot_split=None), toy_record(1, split=split, cot_split=None)]
    stage = write_stage(tmp_path / "stage2", records)
    stats = DataStats()
    config = DataConfig(splits=["D1", "D2"], assign_missing_splits=True)
    assert _ids(select_records(resolve_sources([stage], ["D1"]), config, stats)) == ["toy/train/0"]
    assert stats.skipped == {"no_cot_split": 1}


def test_assign_missing_splits_follows_the_synthesis_runs_dataset_section(tmp_path):
    records = [toy_record(i, cot_split=None) for i in range(40)]
    out = tmp_path / "out"
    stage = write_stage(out / "template_cot" / "k", records)
    (out / "latest.json").write_text(json.dumps({"final_dir": str(stage)}))
    (out / "config.yaml").write_text(yaml.safe_dump({"run": {"seed": 7}, "dataset": {"d1_fraction": 0.3}}))
    config = DataConfig(splits=["D1"], assign_missing_splits=True)
    got = _ids(select_records(resolve_sources([out], ["D1"]), config, DataStats()))
    expected = [r["id"] for r in records if dataset_split(r, DatasetConfig(d1_fraction=0.3), 7) == "D1"]
    assert got == expected and 0 < len(got) < 40


def test_inputs_output_folder_published_dataset_stage_and_files(tmp_path):
    out = tmp_path / "out"
    stage = write_stage(out / "template_cot" / "k", [toy_record(0), toy_record(1)])
    (out / "latest.json").write_text(json.dumps({"final_dir": str(stage)}))
    (stage / "shard-00009.parquet").write_bytes((stage / "shard-00000.parquet").read_bytes())  # no marker: ignored
    assert [s.kind for s in resolve_sources([out], ["D1"])] == ["stage"]
    assert len(list(select_records(resolve_sources([out], ["D1"]), DataConfig(), DataStats()))) == 2
    (out / "dataset" / "D1").mkdir(parents=True)
    write_records(out / "dataset" / "D1" / "part-0.parquet", [toy_record(5)])
    sources = resolve_sources([out], ["D1"])
    assert [s.kind for s in sources] == ["file"] and _ids(sources[0].records()) == ["toy/train/5"]
    # no published D2 (or D2_filtered): the run's final stage is read instead
    assert [s.kind for s in resolve_sources([out], ["D2"])] == ["stage"]
    assert [s.kind for s in resolve_sources([out], ["D2"], filtered=True)] == ["stage"]
    (out / "dataset" / "D2_filtered").mkdir(parents=True)
    write_records(out / "dataset" / "D2_filtered" / "part-0.parquet", [toy_record(6, cot_split="D2")])
    kept = resolve_sources([out], ["D2"], filtered=True)
    assert [s.kind for s in kept] == ["file"] and _ids(kept[0].records()) == ["toy/train/6"]
    assert len(list(select_records(resolve_sources([out], ["D1"], published=False), DataConfig(), DataStats()))) == 2
    assert [s.kind for s in resolve_sources([stage / "shard-00000.parquet"], ["D1"])] == ["file"]
    with pytest.raises(DataError, match="does not exist"):
        resolve_sources([tmp_path / "nope"], ["D1"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no Parquet"):
        resolve_sources([tmp_path / "empty"], ["D1"])


def test_sft_examples_one_per_consistent_chain_in_the_policy_frame(tmp_path):
    image = toy_image(tmp_path)
    record = toy_record(0, image=image)
    extra = dict(record["cot"]["chains"][0], route="constraint_first")
    bad = dict(record["cot"]["chains"][0], consistent=False)
    record["cot"]["chains"] += [extra, bad]
    prompt = StudentPromptConfig(image=True, frame=FrameConfig(kind="qwen2_vl"))
    stats = DataStats()
    rows = list(sft_examples([record], prompt, DataConfig(), stats))
    assert [r["id"] for r in rows] == ["toy/train/0#0", "toy/train/0#1"]
    assert stats.examples == 2 and stats.records_used == 1
    # 100x80 image, box [10,5,50,70] -> 0-1000 frame (62.5 rounds half to even)
    assert "<answer>Alice Smith|PER|[100,62,500,875]; Paris|LOC|None</answer>" in rows[0]["target"]
    assert "[100,62,500,875]" in rows[0]["target"].split("<answer>")[0]
    assert rows[0]["extent_w"] == 1000 and rows[0]["px_per_unit_x"] == pytest.approx(0.1)
    messages = json.loads(rows[0]["messages"])
    assert messages[0]["content"][0] == {"type": "image", "path": str(image), "width": 100, "height": 80}
    one = list(sft_examples([record], prompt, DataConfig(max_chains_per_record=1), DataStats()))
    assert len(one) == 1
    none = list(sft_examples([record], prompt, DataConfig(styles=["mllm"]), stats))
    assert none == [] and stats.skipped["no_consistent_chain"] == 1


def test_a_record_without_its_image_is_an_error_counted_not_a_crash():
    stats = DataStats()
    rows = list(sft_examples([toy_record(0), toy_record(1, image=None)], StudentPromptConfig(image=True),
                             DataConfig(), stats))
    assert rows == [] and stats.error_count == 2 and "no image on disk" in stats.errors[0]


def test_datasets_in_memory_and_streamed(tmp_path):
    stage = write_stage(tmp_path / "stage", [toy_record(i) for i in range(6)], shard_size=2)
    ds, stats = sft_dataset([stage], TEXT, DataConfig())
    assert len(ds) == 6 and stats.examples == 6
    assert ANSWER in ds[0]["target"] and ds[0]["extent_w"] == 100.0
    streamed, _ = sft_dataset([stage], TEXT, DataConfig(streaming=True))
    assert [r["id"] for r in streamed] == [r["id"] for r in ds]
    with pytest.raises(DataError, match="no training example"):
        sft_dataset([stage], TEXT, DataConfig(splits=["D2"]))


def test_grpo_rows_hold_the_gold_in_original_pixels(tmp_path):
    records = [toy_record(0, cot_split="D2", grpo={"keep": True}),
               toy_record(1, cot_split="D2", grpo={"keep": True}, grounding_labels="absent")]
    stage = write_stage(tmp_path / "stage", records)
    ds, stats = grpo_dataset([stage], TEXT, DataConfig(splits=["D2"], require_grpo_keep=True))
    assert len(ds) == 1 and ds[0]["gold"] == ANSWER and (ds[0]["width"], ds[0]["height"]) == (100, 80)
    assert stats.examples == 1 and stats.skipped == {"grounding_absent": 1}  # boxes unknown: no reward possible


def test_presets_load_and_validate():
    for name, kind in (("mcr_sft", "sft"), ("e2e_gmner_sft", "sft"), ("mcr_grpo", "grpo")):
        cfg = load_train_config(name, ["trainer.learning_rate=0.01"], **{"model.name_or_path": "m"})
        assert cfg.kind == kind and cfg.trainer["learning_rate"] == 0.01 and cfg.model.name_or_path == "m"
    grpo = load_train_config("mcr_grpo").trainer
    assert (grpo["num_generations"], grpo["temperature"], grpo["top_k"], grpo["top_p"]) == (8, 1.5, 200, 0.95)
    assert (grpo["epsilon"], grpo["epsilon_high"], grpo["beta"], grpo["learning_rate"]) == (0.15, 0.25, 0.005, 5e-6)
    assert grpo["warmup_steps"] == 0.05 and grpo["loss_type"] == "grpo"
    e2e = load_train_config("e2e_gmner_sft")
    assert (e2e.lora["r"], e2e.lora["lora_alpha"], e2e.trainer["learning_rate"]) == (32, 64, 5e-4)
    from gmner_pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="unknown key"):
        load_train_config("mcr_sft", ["grbp.sigma=1"])
    with pytest.raises(ConfigError, match="use --output"):
        load_train_config("mcr_sft", ["trainer.output_dir=x"])
    with pytest.raises(ConfigError, match="no train preset"):
        load_train_config("nope")
    assert Path(load_train_config("mcr_sft").model_dump()["data"]["splits"][0]) == Path("D1")


@pytest.mark.parametrize("url", ["s3://bucket/out", "gs://bucket/out"])
def test_a_bucket_as_training_input_is_refused_with_what_to_do(url):
    for given in (url, Path(url)):  # typer hands over a Path, which turns s3:// into s3:/
        with pytest.raises(DataError, match="copy the output folder first"):
            resolve_sources([given], ["D1"])
