"""One role identity for the stage key, the lineage and the request cache (llm.identity.role_identity)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gmner_pipeline.hashing import dir_sha256, file_sha256
from gmner_pipeline.llm.client import LLMClient
from gmner_pipeline.llm.config import EndpointConfig, LLMConfig, LLMConfigError, LocalPolicyConfig, RoleConfig
from gmner_pipeline.llm.identity import role_identity, role_kind
from gmner_pipeline.llm.request import LLMRequest
from gmner_pipeline.llm.services import llm_services, resolve_roles
from gmner_pipeline.testing import FakeOpenAI


@pytest.fixture
def llm(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    return LLMConfig.model_validate({
        "embedded": {"model_path": str(gguf)},
        "cache": {"path": str(tmp_path / "cache.sqlite")},
        "roles": {
            "served": {"endpoints": [{"base_url": "http://a:1/v1", "model": "qwen"}], "revision": "r1"},
            "served_lora": {"endpoints": [{"base_url": "http://a:1/v1", "model": "policy"}], "adapter": str(adapter)},
            "embedded": {},
            "named_embedded": {"model_id": "my-gguf"},
            "policy": {"local": {"base_model": str(base), "adapter": str(adapter)}},
            "hub_policy": {"local": {"base_model": "Qwen/Qwen2.5-VL-3B", "revision": "abc"}},
        }})


def test_each_kind_of_role_has_its_identity(llm, tmp_path):
    gguf = file_sha256(tmp_path / "m.gguf")[:12]
    assert role_identity(llm.role("served")) == "qwen@r1"
    assert role_identity(llm.role("embedded"), llm) == f"smollm2-135m-instruct@{gguf}"
    assert role_identity(llm.role("named_embedded"), llm) == f"my-gguf@{gguf}"
    assert role_identity(llm.role("unconfigured"), llm) == f"smollm2-135m-instruct@{gguf}"
    assert role_identity(llm.role("policy")) == (f"local:{tmp_path / 'base'}@{dir_sha256(tmp_path / 'base')[:12]}"
                                                 f"+adapter:{dir_sha256(tmp_path / 'adapter')[:12]}")
    assert role_identity(llm.role("hub_policy")) == "local:Qwen/Qwen2.5-VL-3B@abc"
    assert role_identity(llm.role("served_lora")) == f"policy+adapter:{dir_sha256(tmp_path / 'adapter')[:12]}"
    assert [role_kind(llm.role(r)) for r in ("served", "embedded", "policy")] == ["served", "embedded", "local"]
    with pytest.raises(ValidationError, match="not both"):
        RoleConfig(endpoints=[EndpointConfig(base_url="http://a/v1", model="x")],
                   local=LocalPolicyConfig(base_model="b"))
    with pytest.raises(ValidationError, match="local.adapter instead"):
        RoleConfig(adapter="x", local=LocalPolicyConfig(base_model="b"))


def test_a_new_served_adapter_is_a_new_model(llm, tmp_path):
    # vLLM serves the SFT adapter under one name ("policy") whatever its weights: the folder's hash tells them apart
    before = role_identity(llm.role("served_lora"))
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"new weights")
    assert role_identity(llm.role("served_lora")) != before
    with pytest.raises(LLMConfigError, match="does not exist"):
        role_identity(RoleConfig(endpoints=[EndpointConfig(base_url="http://a/v1", model="x")],
                                 adapter=str(tmp_path / "missing")))


def test_resolving_for_a_run_keeps_every_identity(llm):
    # the driver resolves the config once (embedded endpoint, hashes); workers must see the same identities
    roles = {"served", "served_lora", "embedded", "named_embedded", "policy", "hub_policy", "unconfigured"}
    resolved = resolve_roles(llm, roles, EndpointConfig(base_url="http://127.0.0.1:9/v1", model="smollm2"))
    for name in roles:
        assert role_identity(resolved.role(name)) == role_identity(llm.role(name), llm), name
    assert resolved.role("embedded").endpoints[0].base_url == "http://127.0.0.1:9/v1"
    assert resolved.role("policy").local.revision  # hashed once, in the driver
    assert not resolved.role("policy").endpoints  # a local policy needs no server


def test_local_policies_need_no_endpoint(llm):
    with llm_services(llm, {"served", "policy"}, check=False) as resolved:
        assert resolved.role("policy").local is not None and not resolved.role("policy").endpoints


def test_the_client_caches_and_records_under_the_role_identity(tmp_path):
    with FakeOpenAI(model="qwen") as srv:
        role = RoleConfig(endpoints=[srv.endpoint()], model_id="Qwen/Qwen2.5-7B", revision="r2")
        with LLMClient(role) as client:
            res = client.complete(LLMRequest(messages=[{"role": "user", "content": "hi"}]))
        assert res.ok and res.model == role_identity(role) == "Qwen/Qwen2.5-7B@r2"
