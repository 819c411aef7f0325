"""The embedded default server (llama.cpp with SmolLM2-135M-Instruct, found or fetched as the product does) answering
real prompts through the client, started and stopped by ``llm_services`` as the runner does."""

from __future__ import annotations

import importlib.util
import json
import logging

import pytest

from gmner_pipeline.llm.client import LLMClient
from gmner_pipeline.llm.config import LLMConfig
from gmner_pipeline.llm.identity import role_identity
from gmner_pipeline.llm.process import is_ready
from gmner_pipeline.llm.request import LLMRequest
from gmner_pipeline.llm.services import llm_services

pytestmark = pytest.mark.integration
log = logging.getLogger(__name__)


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed: pip install -e '.[llm]' (the README install does)")
def test_embedded_smollm2_answers_through_the_client(tmp_path):
    config = {"cache": {"path": str(tmp_path / "cache.sqlite")},
              "roles": {"judge": {"sampling": {"max_tokens": 16, "temperature": 0.0}}}}
    with llm_services(config, {"judge", "teacher"}) as resolved:
        judge, teacher = resolved.role("judge"), resolved.role("teacher")
        assert judge.endpoints == teacher.endpoints  # one server shared by the roles without endpoints
        base_url = judge.endpoints[0].base_url
        assert role_identity(judge) == role_identity(LLMConfig.coerce(config).role("judge"), LLMConfig.coerce(config))
        assert role_identity(judge).startswith("smollm2-135m-instruct@")  # the GGUF's sha256 as the revision
        with LLMClient.from_config(resolved.model_dump(mode="json"), "judge") as client:
            res = client.complete(LLMRequest(messages=[{"role": "user", "content": "What is the capital of France?"}]))
            assert res.ok, res.error
            assert res.text.strip() and res.completion_tokens > 0 and res.prompt_tokens > 5
            log.warning("SmolLM2 answered: %r", res.text)
            two = client.complete(LLMRequest(messages=[{"role": "user", "content": "Name a colour."}], n=2,
                                             temperature=1.0, seed=5, max_tokens=4))
            assert two.ok and len(two.choices) == 2  # llama.cpp ignores n: topped up with a seeded request
            schema = {"type": "object", "properties": {"type": {"type": "string", "enum": ["PER", "LOC"]}},
                      "required": ["type"]}
            typed = client.complete(LLMRequest(
                messages=[{"role": "user", "content": "Is Paris a PER or a LOC? Answer in JSON."}],
                response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": schema}}))
            assert typed.ok, typed.error  # sent as llama.cpp's {type: json_object, schema}
            assert json.loads(typed.text)["type"] in {"PER", "LOC"}
    assert not is_ready(base_url, timeout=1)  # stopped when the block ended
