"""distill against REAL vLLM OpenAI servers (the CPU build, tiny random models built here; tests/support/tiny_vllm.py).

* text: the tiny random Qwen2 answers noise, so every chain is rejected: the rejection and re-ask path at scale (40
  records, n=2 per request, two routes, a dead replica beside the live one), nothing lost, every reason counted, and a
  rerun sends nothing;
* multimodal: a tiny random Qwen2-VL gets the sample's photos over the OpenAI API; the prompt token count shows
  that the image reached the model.

Both servers are the session's shared ones (tests/conftest.py), never two at a time.
"""

from __future__ import annotations

import urllib.request

import pytest

from gmner_pipeline.ingest.sample import read_sample
from gmner_pipeline.llm.client import LLMClient
from gmner_pipeline.llm.config import LLMConfig
from gmner_pipeline.llm.process import free_port
from gmner_pipeline.llm.request import LLMRequest
from gmner_pipeline.llm.services import llm_services
from gmner_pipeline.schema import empty_record
from gmner_pipeline.stage import StageContext
from gmner_pipeline.stages.distill import DistillConfig, DistillStage
from gmner_pipeline.stages.distill.check import REASONS
from gmner_pipeline.stages.distill.prompts import base_messages, encode_teacher_image
from gmner_pipeline.worker import run_batch, start_stage, stop_stage
from support.tiny_vllm import MODEL_NAME, VL_MODEL_NAME

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]


def tweet(i: int) -> dict:
    tokens = f"Alice Smith visits Paris with the Red Cross team #{i}".split()
    entities = [
        {"text": "Alice Smith", "start": 0, "end": 2, "type": "PER", "fine_type": None, "boxes": [[10, 5, 50, 70]]},
        {"text": "Paris", "start": 3, "end": 4, "type": "LOC", "fine_type": None, "boxes": []},
        {"text": "Red Cross", "start": 6, "end": 8, "type": "ORG", "fine_type": None, "boxes": []},
    ]
    return empty_record(id=f"t/train/{i}", source="t", split="train", sample_key=str(i), text=" ".join(tokens),
                        tokens=tokens, entities=entities, grounding_labels="present",
                        image={"path": None, "uri": None, "sha256": None, "width": 100, "height": 80})


def role(base_url: str, model: str, **more) -> dict:
    return {"endpoints": [{"base_url": base_url, "model": model, "max_concurrency": 16}],
            "sampling": {"temperature": 1.0, "max_tokens": 32, "seed": 0},
            "retry": {"initial_backoff_s": 0.05, "max_backoff_s": 0.5, "max_total_s": 300}, **more}


def run(config: DistillConfig, llm: dict, records: list[dict]) -> tuple[list[dict], dict[str, int], dict]:
    """The stage as a worker runs it, with its counters and its clients' stats."""
    with llm_services(llm, config.roles()) as resolved:
        stage = start_stage(DistillStage, config, StageContext(llm=resolved))
        try:
            out = run_batch(stage, records)
            return out, stage.take_counters(), stage.llm.stats()
        finally:
            stop_stage(stage)


def metric(base_url: str, name: str) -> float:
    """A counter of vLLM's Prometheus endpoint (summed over its label sets); 0 when absent."""
    text = urllib.request.urlopen(base_url.removesuffix("/v1") + "/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def test_every_chain_of_a_random_teacher_is_rejected_nothing_is_lost(vllm_server, tmp_path):
    records = [tweet(i) for i in range(40)]
    teacher = role(vllm_server.base_url, MODEL_NAME)
    dead = {"base_url": f"http://127.0.0.1:{free_port()}/v1", "model": MODEL_NAME}  # a replica that is down
    teacher["endpoints"].append(dead)
    teacher["circuit"] = {"cooldown_s": 60}
    llm = {"roles": {"teacher": teacher}, "cache": {"path": str(tmp_path / "cache.sqlite")}}
    config = DistillConfig(styles=["llm"], llm={"chains": 2, "max_attempts": 2}, batch_size=64)
    hits_before = metric(vllm_server.base_url, "vllm:prefix_cache_hits_total")

    out, counters, stats = run(config, llm, records)

    assert [r["id"] for r in out] == [r["id"] for r in records] and all(r["status"] == "ok" for r in out)
    chains = [c for r in out for c in r["cot"]["chains"]]
    assert len(chains) == 40 * 2 * 2 and not any(c["consistent"] for c in chains)
    reasons = {c["rejection"].split(":")[0] for c in chains}
    assert reasons <= set(REASONS) | {"llm_bad_request"}, reasons
    assert all(c["attempts"] == 2 or c["rejection"].startswith("llm_bad_request") for c in chains)
    assert counters["llm:chains"] == 160 and sum(n for k, n in counters.items() if "rejected" in k) == 160
    assert counters["llm:reasks"] >= 150
    # n=2 went to vLLM as one request: 80 first asks + one re-ask per chain, nothing per choice of the first ask
    requests = stats["teacher"]["requests"]
    assert requests == 80 + counters["llm:reasks"]
    assert stats["teacher"]["by_endpoint"].get(dead["base_url"], 0) == 0
    # every request of a route starts with the same static text: vLLM's prefix cache served it
    assert metric(vllm_server.base_url, "vllm:prefix_cache_hits_total") > hits_before

    again, counters_again, stats_again = run(config, llm, records)  # a rerun: the style store answers, nothing sent
    assert [r["cot"] for r in again] == [r["cot"] for r in out]
    assert counters_again["llm:reused"] == 40 and stats_again.get("teacher", {}).get("requests", 0) == 0


def test_images_reach_a_real_multimodal_server(vllm_vl_server, tmp_path):
    records = list(read_sample(tmp_path / "cache"))[:4]
    llm = {"roles": {"vlm_teacher": role(vllm_vl_server.base_url, VL_MODEL_NAME, frame={"kind": "qwen2_vl"})},
           "cache": {"path": str(tmp_path / "cache.sqlite")}}
    config = DistillConfig(styles=["template", "mllm"], mllm={"max_attempts": 1})

    out, counters, stats = run(config, llm, records)

    assert all(r["status"] == "ok" for r in out)
    mllm = [c for r in out for c in r["cot"]["chains"] if c["style"] == "mllm"]
    assert len(mllm) == 4 and all(c["model_id"] == VL_MODEL_NAME and c["frame"] == "qwen2_vl" for c in mllm)
    assert counters["mllm:chains"] == 4 and counters["template:consistent"] == 8
    assert stats["vlm_teacher"]["errors"] == {}

    # the same request with and without its image: the image's patch tokens are in the prompt count
    record = records[0]
    url = encode_teacher_image(record["image"]["path"], llm_frame(), LLMConfig().images,
                               (record["image"]["width"], record["image"]["height"]))
    with LLMClient.from_config(llm, "vlm_teacher") as client:
        with_image = client.complete(LLMRequest(messages=base_messages("system", "Describe.", url), max_tokens=4))
        without = client.complete(LLMRequest(messages=base_messages("system", "Describe."), max_tokens=4))
    assert with_image.ok and without.ok, (with_image.error, without.error)
    assert with_image.prompt_tokens >= without.prompt_tokens + 16  # 4..64 patches of 28 px for this processor
    assert all(c["prompt_tokens"] > with_image.prompt_tokens for c in mllm)  # the stage's prompts carry it too


def llm_frame():
    from gmner_pipeline.frames import FrameConfig

    return FrameConfig(kind="qwen2_vl")
