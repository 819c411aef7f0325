"""The knowledge stage against a REAL vLLM server that enforces ``json_schema`` (the tiny random Qwen2 of
``tests/support/tiny_vllm.py``, its venv built once in ``.cache/vllm``): with random weights, every generator
answer is still valid JSON of the requested shape, every fine type is one the ontology allows (the schema's enum),
the voter's aspects and support letters come from the schema's enums, and what the weights make up is then caught
by the vote's checks. The server gets a longer context than the client tests' (the stage's prompts are longer)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from gmner_pipeline.schema import empty_record
from gmner_pipeline.stages.knowledge import KnowledgeStage
from gmner_pipeline.stages.knowledge.ontology import FMNERG
from gmner_pipeline.testing import run_stage
from support.tiny_vllm import MODEL_NAME, ensure_vllm, start_vllm

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]
log = logging.getLogger(__name__)

VLLM_ROOT = Path(__file__).resolve().parents[2] / ".cache" / "vllm"
CONTEXT = ["--max-model-len", "2048", "--hf-overrides", json.dumps({"max_position_embeddings": 2048})]


@pytest.fixture(scope="module")
def vllm_long():
    """One vLLM server for this file (started after test_llm_vllm.py's has stopped: never two at once)."""
    t0 = time.perf_counter()
    ensure_vllm(VLLM_ROOT)
    server = start_vllm(VLLM_ROOT, extra_args=CONTEXT)
    log.warning("vLLM (2048-token context) ready in %.1f s", time.perf_counter() - t0)
    try:
        yield server
    finally:
        server.stop()


def test_json_schema_is_enforced_for_generators_and_voter(vllm_long, tmp_path):
    endpoint = {"base_url": vllm_long.base_url, "model": MODEL_NAME, "max_concurrency": 8}
    roles = {name: {"endpoints": [endpoint], "model_id": f"tiny-qwen2-{name}",  # distinct identities, one server
                    "sampling": {"temperature": 1.0, "seed": i},
                    "retry": {"initial_backoff_s": 0.1, "max_backoff_s": 1, "max_total_s": 120}}
             for i, name in enumerate(["g1", "g2", "g3", "voter", "summary"])}
    records = [empty_record(id=f"t/train/{i}", source="t", text=text, tokens=text.split(), entities=[
        {"text": ent, "start": 0, "end": len(ent.split()), "type": type_, "fine_type": None, "boxes": []}])
        for i, (text, ent, type_) in enumerate([("Kevin Love scores", "Kevin Love", "PER"),
                                                 ("NASA launches", "NASA", "ORG"),
                                                 ("Falcon 9 rises", "Falcon 9", "OTHER")])]
    counters: dict[str, int] = {}
    out = run_stage(KnowledgeStage, records,
                    {"generators": ["g1", "g2", "g3"], "voter": "voter", "summary": "summary", "max_aspects": 2,
                     "generator_max_tokens": 200, "voter_max_tokens": 300, "summary_max_tokens": 32},
                    llm={"roles": roles, "cache": {"path": str(tmp_path / "cache.sqlite")}}, counters=counters)
    allowed = {"PER": set(FMNERG["person"]), "ORG": set(FMNERG["organization"]),
               "OTHER": {f for c in ("building", "product", "art", "event", "other") for f in FMNERG[c]}}
    for rec in out:
        item = rec["knowledge"][0]
        for answer in item["answers"]:
            assert answer["ok"], answer  # read, even when cut at max_tokens (random weights love whitespace)
            if answer["text"].rstrip().endswith("}"):  # a complete answer has exactly the schema's shape
                obj = json.loads(answer["text"])
                assert set(obj) == {"fine_type", "aspects"} and set(obj["aspects"]) <= {
                    "gender", "face", "logo", "slogan", "appearance", "background"}
            # random weights, and still never a fine type outside the ontology: the schema's enum holds them
            assert answer["fine_type"] is None or answer["fine_type"] in allowed[item["type"]], answer
        assert any(a["fine_type"] for a in item["answers"])
        assert item["fine_type"] in allowed[item["type"]] and item["status"] in {"ok", "no_agreement"}
        assert item["tokens"][0]["role"] == "g1" and item["tokens"][0]["prompt_tokens"] > 200
    # the voter answered with its schema for every entity, and was read; what the weights made up was rejected
    assert not any(k.startswith(("entity_failed", "generator_failed")) for k in counters), counters
    assert out[0]["lineage"][-1]["prompt_tokens"] > 0
