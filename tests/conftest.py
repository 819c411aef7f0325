"""Shared test fixtures: small datasets in Twitter-GMNER layout, the ../shared folder, a local Ray instance."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
# ../shared beside the checkout (CI and developers); GMNER_SHARED_DIR points elsewhere.
SHARED = Path(os.environ.get("GMNER_SHARED_DIR") or REPO_ROOT.parent / "shared")
GMNER_V2 = SHARED / "data" / "twitter-gmner-v2"

# Local Ray instances in tests: no dashboard, small object store, no usage-stats prompt.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def needs_shared(path: Path = SHARED):
    return pytest.mark.skipif(not path.exists(), reason=f"{path} is absent (tests that use ../shared data)")


def write_gmner_dataset(root: Path, n: int, split: str = "train", with_xml_every: int = 3) -> Path:
    """A synthetic dataset in Twitter-GMNER layout: n tweets, every ``with_xml_every``-th with a VOC file."""
    (root / "txt").mkdir(parents=True, exist_ok=True)
    (root / "xml").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        lines += [f"IMGID:{1000 + i}", "Alice\tB-PER", "Smith\tI-PER", "visits\tO", "Paris\tB-LOC", f"#{i}\tO", ""]
        if i % with_xml_every == 0:
            (root / "xml" / f"{1000 + i}.xml").write_text(
                "<annotation><size><width>100</width><height>80</height><depth>3</depth></size>"
                "<object><name>Alice Smith</name><bndbox><xmin>10</xmin><ymin>5</ymin><xmax>50</xmax>"
                "<ymax>70</ymax></bndbox></object></annotation>", encoding="utf-8")
    (root / "txt" / f"{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture
def gmner_dataset(tmp_path: Path) -> Path:
    return write_gmner_dataset(tmp_path / "data", 24)


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray instance for the session; the runner reuses an initialised Ray."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        # address="local": a new instance even when `ray start` ran on this machine (or left a stale address file)
        ray.init(address="local", num_cpus=2, object_store_memory=256 * 1024 * 1024, include_dashboard=False,
                 logging_level="WARNING")
    yield ray
    ray.shutdown()


# --- the trainer's tiny random-weight policies (built offline once per session, only by tests that ask) ------------

@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    pytest.importorskip("trl")
    from support.tiny_policies import build_tiny_qwen2

    return build_tiny_qwen2(tmp_path_factory.mktemp("tiny-policies") / "qwen2")


@pytest.fixture(scope="session")
def tiny_qwen2_vl(tmp_path_factory) -> Path:
    pytest.importorskip("trl")
    from support.tiny_policies import build_tiny_qwen2_vl

    return build_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny-policies") / "qwen2-vl")


SFT_SMOKE = ["trainer.per_device_train_batch_size=2", "trainer.gradient_accumulation_steps=1",
             "trainer.gradient_checkpointing=false", "trainer.logging_steps=1", "trainer.lr_scheduler_type=constant",
             "lora.r=16", "lora.lora_alpha=32", "lora.lora_dropout=0.0"]


@pytest.fixture(scope="session")
def trained_sft(tmp_path_factory, tiny_qwen2):
    """A tiny text policy LoRA-SFT'd for 16 steps on two toy D1 records (it then writes their answers verbatim),
    with the shard bytes hashed before training. Shared by the SFT, GRPO, predict and CLI tests."""
    import hashlib

    from gmner_pipeline.train.config import load_train_config
    from gmner_pipeline.train.sft import run_sft
    from support.train_records import toy_record, write_stage

    root = tmp_path_factory.mktemp("trained-sft")
    records = [toy_record(0), toy_record(1)] + [toy_record(i, cot_split="D2", grpo={"keep": True}) for i in (2, 3)]
    stage = write_stage(root / "stage", records)
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(stage.iterdir())}
    config = load_train_config("mcr_sft", SFT_SMOKE + ["trainer.max_steps=16", "trainer.learning_rate=0.02",
                                                       "trainer.save_strategy=steps", "trainer.save_steps=8",
                                                       "grbp.enabled=false"],
                               **{"model.name_or_path": str(tiny_qwen2)})
    result = run_sft(config, [stage], root / "sft")
    return {"root": root, "stage": stage, "records": records, "digest": digest, "result": result,
            "output": root / "sft", "config": config}
