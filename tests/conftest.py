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


# --- real vLLM CPU servers, shared by every test file ------------------------------------------------------------------
# A vLLM CPU server costs ~60-110 s to start and ~3 GB, and an idle one still takes CPU from a 2-core machine. So each
# kind is started once per session, the tests that use it are run one after another (collection puts them together,
# at the place of the first one), and it is stopped right after the last of them. Never two at a time.

class SharedServer:
    """A server started on first use and stopped by ``pytest_runtest_teardown`` after the last test using it."""

    def __init__(self, start):
        self._start = start
        self.server = None

    def get(self):
        if self.server is None:
            self.server = self._start()
        return self.server

    def stop(self):
        if self.server is not None:
            self.server.stop()
            self.server = None


def _start_tiny_vllm():
    import json
    import logging
    import time

    from support.tiny_vllm import NO_SPLIT_PREFILL, ensure_long_model, ensure_lora_adapter, start_vllm

    root = REPO_ROOT / ".cache" / "vllm"
    t0 = time.perf_counter()
    timings = ensure_long_model(root)
    # 2048 tokens: room for the distill stage's prompts and re-asks (the 4096-position build of the tiny Qwen2).
    adapter = ensure_lora_adapter(root)  # a random LoRA served as "policy" (grpo_filter's served policy), with peft
    server = start_vllm(root, max_model_len=2048, long=True, extra_args=NO_SPLIT_PREFILL,
                        lora={"policy": adapter} if adapter else None)
    timings.update(ready_s=server.started_s, fixture_total_s=time.perf_counter() - t0)
    (root / "last-fixture-timings.json").write_text(json.dumps(timings, indent=1))
    logging.getLogger(__name__).warning("vLLM fixture: %s", timings)
    return server


def _start_tiny_vllm_vl():
    import logging
    import time

    from support.tiny_vllm import ensure_vllm_vl, start_vllm_vl

    t0 = time.perf_counter()
    timings = ensure_vllm_vl(REPO_ROOT / ".cache" / "vllm")
    server = start_vllm_vl(REPO_ROOT / ".cache" / "vllm")
    timings.update(ready_s=server.started_s, fixture_total_s=time.perf_counter() - t0)
    logging.getLogger(__name__).warning("vLLM VL fixture: %s", timings)
    return server


SHARED_SERVERS = {"vllm_server": SharedServer(_start_tiny_vllm), "vllm_vl_server": SharedServer(_start_tiny_vllm_vl)}


@pytest.fixture
def vllm_server():
    """The real vLLM OpenAI server with a tiny random Qwen2 (``tests/support/tiny_vllm.py``), max-model-len 2048."""
    return SHARED_SERVERS["vllm_server"].get()


@pytest.fixture
def vllm_vl_server():
    """The real vLLM OpenAI server with a tiny random Qwen2-VL (images over the OpenAI API)."""
    return SHARED_SERVERS["vllm_vl_server"].get()


def pytest_collection_modifyitems(items):
    """Run the tests of each shared server one after another, where the first of them was collected."""
    for name in SHARED_SERVERS:
        users = [item for item in items if name in getattr(item, "fixturenames", ())]
        if not users:
            continue
        first = items.index(users[0])
        chosen = set(map(id, users))
        rest = [item for item in items if id(item) not in chosen]
        before = sum(1 for item in items[:first] if id(item) not in chosen)
        items[:] = rest[:before] + users + rest[before:]


def pytest_runtest_teardown(item, nextitem):
    for name, shared in SHARED_SERVERS.items():
        if name in getattr(item, "fixturenames", ()) and (
                nextitem is None or name not in getattr(nextitem, "fixturenames", ())):
            shared.stop()


def pytest_sessionfinish(session, exitstatus):
    for shared in SHARED_SERVERS.values():
        shared.stop()

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


def session_processes(sid: int) -> list:
    """Every live process of session ``sid``: what a driver started with ``start_new_session`` left behind (its
    local Ray processes) after it was killed."""
    import psutil

    procs = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid:
                procs.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return procs
