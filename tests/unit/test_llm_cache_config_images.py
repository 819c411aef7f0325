"""Request cache (keys, backends, many processes), config validation, images, services without a server."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest
from PIL import Image
from pydantic import ValidationError

from gmner_pipeline.llm.accounting import lineage_usage
from gmner_pipeline.llm.cache import FileCache, SqliteCache, open_cache, request_key
from gmner_pipeline.llm.config import CacheConfig, EndpointConfig, ImageConfig, LLMConfig, RoleConfig
from gmner_pipeline.llm.images import encode_image, image_part, resize_to_fit, user_message
from gmner_pipeline.llm.request import Choice, LLMResult
from gmner_pipeline.llm.identity import role_identity
from gmner_pipeline.llm.services import LLMConfigError, llm_services

MSG = [{"role": "user", "content": "hi"}]
PARAMS = {"n": 1, "seed": 0, "temperature": 0.0, "max_tokens": 16}


def test_key_covers_model_messages_and_every_parameter():
    base = request_key("m", MSG, PARAMS)
    assert base == request_key("m", [dict(m) for m in MSG], dict(PARAMS))
    assert base != request_key("m@rev2", MSG, PARAMS)
    assert base != request_key("other", MSG, PARAMS)
    assert base != request_key("m", [{"role": "user", "content": "hi!"}], PARAMS)
    for change in ({"n": 2}, {"seed": 1}, {"temperature": 0.1}, {"max_tokens": 17}, {"top_p": 0.9},
                   {"logprobs": True}, {"response_format": {"type": "json_object"}}, {"extra_body": {"top_k": 5}}):
        assert base != request_key("m", MSG, {**PARAMS, **change}), change
    assert base == request_key("m", MSG, {**PARAMS, "top_p": None})  # unset == absent


def test_key_hashes_image_content(tmp_path):
    red, blue = Image.new("RGB", (32, 32), "red"), Image.new("RGB", (32, 32), "blue")

    def msg(img):
        return [user_message("what is this?", [img])]

    assert request_key("m", msg(red), PARAMS) == request_key("m", msg(red.copy()), PARAMS)
    assert request_key("m", msg(red), PARAMS) != request_key("m", msg(blue), PARAMS)


@pytest.mark.parametrize("backend", [SqliteCache, FileCache])
def test_cache_roundtrip(tmp_path, backend):
    cache = backend(tmp_path / "c")
    assert cache.get("k" * 64) is None
    result = LLMResult(choices=[Choice("a", "stop", [{"token": "a", "logprob": -0.1}])], model="m",
                       prompt_tokens=3, completion_tokens=1)
    cache.put("k" * 64, result.to_cache())
    back = LLMResult.from_cache(cache.get("k" * 64), "k" * 64)
    assert back.cached and back.choices == result.choices and back.completion_tokens == 1
    cache.close()


def _hammer(args: tuple[str, str, int]) -> int:
    backend, path, worker = args
    cache = SqliteCache(path) if backend == "sqlite" else FileCache(path)
    for i in range(150):
        key = f"{i:064d}"
        cache.put(key, {"choices": [{"text": f"{i}"}], "worker": worker})
        got = cache.get(key)
        assert got is not None and got["choices"][0]["text"] == f"{i}"
    cache.close()
    return worker


@pytest.mark.parametrize("backend", ["sqlite", "files"])
def test_cache_is_safe_with_many_processes(tmp_path, backend):
    path = str(tmp_path / ("c.sqlite" if backend == "sqlite" else "c"))
    # spawn, not fork: forking a process in which Ray (or any threaded library) runs can deadlock the child
    with mp.get_context("spawn").Pool(4) as pool:
        assert sorted(pool.map(_hammer, [(backend, path, w) for w in range(4)])) == [0, 1, 2, 3]
    cache = SqliteCache(path) if backend == "sqlite" else FileCache(path)
    assert len(cache) == 150
    assert not list(Path(path).rglob("*.tmp")) if backend == "files" else True


def test_file_cache_ignores_a_torn_entry(tmp_path):
    cache = FileCache(tmp_path)
    key = "ab" * 32
    cache._file(key).parent.mkdir(parents=True)
    cache._file(key).write_text('{"choices": [')
    assert cache.get(key) is None


def test_cache_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("GMNER_LLM_CACHE", str(tmp_path / "env.sqlite"))
    assert CacheConfig().resolved_path() == tmp_path / "env.sqlite"
    assert CacheConfig(path=str(tmp_path / "x")).resolved_path() == tmp_path / "x"
    assert open_cache(CacheConfig(enabled=False)) is None
    assert isinstance(open_cache(CacheConfig(backend="files", path=str(tmp_path / "f"))), FileCache)


def test_config_rejects_unknown_keys_and_mixed_models():
    with pytest.raises(ValidationError, match="extra"):
        LLMConfig.model_validate({"roles": {"t": {"endpoint": []}}})
    with pytest.raises(ValidationError, match="one model"):
        RoleConfig(endpoints=[EndpointConfig(base_url="http://a/v1", model="x"),
                              EndpointConfig(base_url="http://b/v1", model="y")])
    with pytest.raises(ValidationError, match="http"):
        EndpointConfig(base_url="localhost:8000", model="x")
    role = RoleConfig(endpoints=[EndpointConfig(base_url="http://a/v1/", model="x")], revision="abc")
    assert role_identity(role) == "x@abc" and role.endpoints[0].base_url == "http://a/v1"
    assert LLMConfig().role("anything").endpoints == []


def test_resize_keeps_aspect_and_never_enlarges():
    assert resize_to_fit(Image.new("RGB", (2000, 1000)), 500).size == (500, 250)
    assert resize_to_fit(Image.new("RGB", (100, 50)), 500).size == (100, 50)


def test_image_parts(tmp_path):
    path = tmp_path / "x.png"
    Image.new("RGBA", (1200, 600), (255, 0, 0, 128)).save(path)
    part = image_part(path, ImageConfig(max_side=300))
    url = part["image_url"]["url"]
    assert part["type"] == "image_url" and url.startswith("data:image/jpeg;base64,")
    assert encode_image(path, ImageConfig(max_side=300)) == url  # deterministic -> stable cache keys
    import base64
    import io
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (300, 150)
    msg = user_message("describe", [path])
    assert msg["content"][0]["type"] == "image_url" and msg["content"][-1] == {"type": "text", "text": "describe"}
    with pytest.raises(ValueError, match="not found"):
        image_part(tmp_path / "missing.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read"):
        image_part(tmp_path / "bad.jpg")


def test_lineage_usage_sums_a_records_requests():
    rs = [LLMResult(model="a", prompt_tokens=3, completion_tokens=2, latency_s=0.5),
          LLMResult(model="b", prompt_tokens=1, completion_tokens=1, latency_s=0.25, cached=True)]
    assert lineage_usage(rs) == {"model_ids": ["a", "b"], "prompt_tokens": 4, "completion_tokens": 3,
                                 "seconds": 0.75}
    assert rs[1].usage()["cached"] is True


def test_services_pass_configured_roles_through_and_explain_missing_ones():
    cfg = {"roles": {"t": {"endpoints": [{"base_url": "http://a:1/v1", "model": "x"}]}}}
    with llm_services(cfg, {"t"}, check=False) as resolved:
        assert resolved.role("t").endpoints[0].base_url == "http://a:1/v1"
    with pytest.raises(LLMConfigError, match="embedded"):
        with llm_services({**cfg, "embedded": {"enabled": False}}, {"t", "judge"}, check=False):
            pass


def test_preflight_fails_a_role_with_no_working_endpoint_and_tolerates_one_dead_replica(caplog):
    from gmner_pipeline.llm.process import free_port
    from gmner_pipeline.testing import FakeOpenAI

    dead = {"base_url": f"http://127.0.0.1:{free_port()}/v1", "model": "fake-model"}
    with FakeOpenAI() as srv:
        live = {"base_url": srv.base_url, "model": "fake-model"}
        with llm_services({"roles": {"t": {"endpoints": [dead, live]}}}, {"t"}) as resolved:
            assert len(resolved.role("t").endpoints) == 2
        assert "unreachable" in caplog.text
        with pytest.raises(LLMConfigError, match="does not serve model 'other'"):
            with llm_services({"roles": {"t": {"endpoints": [{**live, "model": "other"}]}}}, {"t"}):
                pass
        with pytest.raises(LLMConfigError, match="no endpoint works"):
            with llm_services({"roles": {"t": {"endpoints": [dead]}}}, {"t"}):
                pass
