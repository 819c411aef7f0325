"""LLM client against the in-process fake OpenAI server: faults, failover, n, passthrough, secrets."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

from gmner_pipeline.llm.cache import SqliteCache
from gmner_pipeline.llm.client import LLMClient, NoEndpoint
from gmner_pipeline.llm.config import CircuitConfig, LLMConfig, RetryConfig, RoleConfig, SamplingConfig
from gmner_pipeline.llm.request import BAD_REQUEST, EXHAUSTED, MALFORMED, LLMRequest
from gmner_pipeline.testing import Fault, FakeOpenAI

FAST = RetryConfig(initial_backoff_s=0.01, max_backoff_s=0.05, jitter_s=0.01, max_attempts=8, max_total_s=20)


def role_for(*servers: FakeOpenAI, retry: RetryConfig = FAST, circuit: CircuitConfig | None = None,
             **kw) -> RoleConfig:
    return RoleConfig(endpoints=[s.endpoint(**kw) for s in servers], retry=retry,
                      circuit=circuit or CircuitConfig(failure_threshold=3, cooldown_s=0.2, max_cooldown_s=1.0))


def ask(text: str, **kw) -> LLMRequest:
    return LLMRequest(messages=[{"role": "user", "content": text}], **kw)


@pytest.fixture
def fake():
    with FakeOpenAI() as srv:
        yield srv


def test_answer_and_accounting(fake):
    with LLMClient(role_for(fake)) as client:
        res = client.complete(ask("hello world"))
        assert res.ok and res.text == "echo: hello world"
        assert (res.prompt_tokens, res.completion_tokens, res.attempts, res.retries) == (2, 3, 1, 0)
        stats = client.stats()
    assert stats["requests"] == 1 and stats["completion_tokens"] == 3 and stats["cache_misses"] == 1


def test_429_storm_all_requests_succeed(fake):
    fake.fault_fn = lambda body, i: Fault.status_code(429, retry_after=0) if i < 60 else None
    with LLMClient(role_for(fake, max_concurrency=8, )) as client:
        results = client.complete_many([ask(f"q{i}") for i in range(20)])
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert [r.text for r in results] == [f"echo: q{i}" for i in range(20)]
    assert sum(r.retries for r in results) == 60
    assert client.accounting.retries == 60


def test_retry_after_is_honoured(fake):
    fake.faults.append(Fault.status_code(429, retry_after=0.4))
    with LLMClient(role_for(fake, retry=FAST.model_copy(update={"max_backoff_s": 1.0}))) as client:
        t0 = time.perf_counter()
        assert client.complete(ask("x")).ok
        assert time.perf_counter() - t0 >= 0.4


@pytest.mark.parametrize("fault", [Fault.status_code(500), Fault.status_code(503), Fault.status_code(502),
                                   Fault.status_code(408), Fault.malformed(), Fault.truncated(), Fault.drop(),
                                   Fault.no_choices()],
                         ids=["500", "503", "502", "408", "malformed-json", "truncated-body", "dropped", "no-choices"])
def test_transient_faults_are_retried(fake, fault):
    fake.faults += [fault, fault]
    with LLMClient(role_for(fake, )) as client:
        res = client.complete(ask("x"))
    assert res.ok, res.error
    assert res.attempts == 3 and fake.calls == 3


def test_timeout_is_retried_and_slow_answers_within_timeout_are_fine(fake):
    role = role_for(fake).model_copy(update={"timeout_s": 0.8})
    fake.faults += [Fault.slow(2.0), Fault.slow(0.05)]
    with LLMClient(role) as client:
        first = client.complete(ask("a"))   # 2 s > 0.8 s: times out, retried
        second = client.complete(ask("b"))  # 0.05 s: fine, even on a busy machine
    assert first.ok and first.attempts == 2
    assert second.ok and second.attempts == 1


@pytest.mark.parametrize("code", [400, 404, 422])
def test_client_errors_are_not_retried(fake, code):
    fake.faults.append(Fault.status_code(code, message="This model's maximum context length is 256 tokens"))
    with LLMClient(role_for(fake)) as client:
        res = client.complete(ask("too long"))
    assert not res.ok and res.error_kind == BAD_REQUEST and res.attempts == 1 and fake.calls == 1
    assert "maximum context length" in res.error
    assert client.accounting.errors[BAD_REQUEST] == 1


def test_a_bad_request_does_not_take_the_endpoint_out(fake):
    fake.faults += [Fault.status_code(400)] * 5
    with LLMClient(role_for(fake)) as client:
        assert all(not r.ok for r in client.complete_many([ask(f"{i}") for i in range(5)]))
        assert client.complete(ask("fine")).ok
        assert not client.endpoints[0].tripped()


def test_persistent_malformed_gives_an_error_result_not_an_exception(fake):
    fake.fault_fn = lambda body, i: Fault.malformed()
    retry = FAST.model_copy(update={"max_attempts": 3})
    with LLMClient(role_for(fake, retry=retry)) as client:
        res = client.complete(ask("x"))
    assert not res.ok and res.error_kind == MALFORMED and res.attempts == 3


def test_dead_endpoint_gives_errors_within_the_time_budget():
    srv = FakeOpenAI().start()
    srv.stop()
    retry = FAST.model_copy(update={"max_attempts": 4, "max_total_s": 1.5})
    with LLMClient(role_for(srv, retry=retry)) as client:
        t0 = time.perf_counter()
        results = client.complete_many([ask(f"{i}") for i in range(5)])
    assert all(r.error_kind == EXHAUSTED for r in results), results
    assert time.perf_counter() - t0 < 6
    assert "out of rotation" in results[-1].error or "Connection" in results[-1].error


def test_replica_dying_mid_run_fails_nothing():
    a, b = FakeOpenAI(delay_s=0.01).start(), FakeOpenAI(delay_s=0.01).start()
    try:
        with LLMClient(role_for(a, b, max_concurrency=4)) as client:
            def kill_a_after_10_requests() -> None:
                while a.calls < 10:
                    time.sleep(0.005)
                a.stop()

            killer = threading.Thread(target=kill_a_after_10_requests)
            killer.start()
            results = client.complete_many([ask(f"q{i}") for i in range(120)])
            killer.join()
            assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]
            assert [r.text for r in results] == [f"echo: q{i}" for i in range(120)]
            served = client.accounting.endpoints
            assert served[b.base_url] > served[a.base_url] > 0
            assert client.endpoints[0].tripped()  # the dead one left the rotation
    finally:
        a.stop()
        b.stop()


def test_endpoint_returns_to_rotation_after_cooldown(fake):
    fake.faults += [Fault.status_code(503)] * 3
    circuit = CircuitConfig(failure_threshold=3, cooldown_s=0.3, max_cooldown_s=1)
    with LLMClient(role_for(fake, circuit=circuit)) as client:
        res = client.complete(ask("x"))  # 3 failures trip it; the 4th attempt waits out the cooldown and probes
        assert res.ok and res.attempts == 4
        assert not client.endpoints[0].tripped()


def test_load_spreads_by_weight():
    a, b = FakeOpenAI(delay_s=0.02).start(), FakeOpenAI(delay_s=0.02).start()
    try:
        role = RoleConfig(endpoints=[a.endpoint(weight=3, max_concurrency=16), b.endpoint(weight=1, max_concurrency=16)],
                          retry=FAST)
        with LLMClient(role) as client:
            assert all(r.ok for r in client.complete_many([ask(f"{i}") for i in range(80)]))
        assert a.calls > b.calls > 0
    finally:
        a.stop()
        b.stop()


def test_server_n_is_used_when_honoured(fake):
    with LLMClient(role_for(fake)) as client:
        res = client.complete(ask("x", n=3))
    assert len(res.texts) == 3 and fake.calls == 1 and fake.seen[0].body["n"] == 3


def test_n_falls_back_to_distinct_seeds_when_the_server_ignores_it():
    with FakeOpenAI(honor_n=False) as srv, LLMClient(role_for(srv)) as client:
        res = client.complete(ask("x", n=3, seed=100))
        assert res.ok and len(res.texts) == 3
        assert [s.body.get("seed") for s in srv.seen] == [100, 101, 102]
        assert len(set(res.texts)) == 3
        srv.seen.clear()
        client.complete(ask("y", n=2, seed=7))  # now known: straight to seeded requests with n=1
        assert sorted(s.body["seed"] for s in srv.seen) == [7, 8] and all(s.body["n"] == 1 for s in srv.seen)


def test_seeds_mode_without_a_seed_is_still_deterministic(fake):
    role = role_for(fake).model_copy(update={"n_mode": "seeds"})
    with LLMClient(role) as client:
        client.complete(ask("x", n=2))
        client.complete(ask("x", n=2, temperature=0.5))
    first, second = sorted(s.body["seed"] for s in fake.seen[:2]), sorted(s.body["seed"] for s in fake.seen[2:])
    assert first[1] == first[0] + 1 and len(second) == 2


def test_sampling_logprobs_and_response_format_pass_through(fake):
    role = role_for(fake).model_copy(update={"sampling": SamplingConfig(temperature=0.7, top_p=0.9, top_k=20,
                                                                        max_tokens=33, stop=["</s>"])})
    schema = {"type": "json_schema", "json_schema": {"name": "t", "schema": {"type": "object"}}}
    with LLMClient(role) as client:
        res = client.complete(ask("x", logprobs=True, top_logprobs=2, response_format=schema, max_tokens=7))
    body = fake.seen[0].body
    assert body["temperature"] == 0.7 and body["top_p"] == 0.9 and body["top_k"] == 20 and body["stop"] == ["</s>"]
    assert body["max_tokens"] == 7 and body["response_format"] == schema and body["top_logprobs"] == 2
    assert res.choices[0].logprobs and len(res.choices[0].logprobs[0]["top_logprobs"]) == 2


def test_cache_hit_sends_nothing_and_errors_are_not_cached(fake, tmp_path):
    cache = SqliteCache(tmp_path / "c.sqlite")
    with LLMClient(role_for(fake), cache=cache) as client:
        fake.faults.append(Fault.status_code(400))
        assert not client.complete(ask("a")).ok
        assert client.complete(ask("a")).ok            # the error was not cached: asked again
        hit = client.complete(ask("a"))
        assert hit.cached and hit.attempts == 0 and hit.text == "echo: a" and hit.completion_tokens == 3
        assert not client.complete(ask("a", seed=1)).cached  # any parameter change is a different key
        stats = client.stats()
    assert fake.calls == 3 and stats["cache_hits"] == 1 and stats["cache_misses"] == 3


def test_cache_survives_a_new_client_like_a_rerun(fake, tmp_path):
    config = {"roles": {"r": role_for(fake).model_dump()}, "cache": {"path": str(tmp_path / "c.sqlite")}}
    with LLMClient.from_config(config, "r") as first:
        first.complete_many([ask(f"{i}") for i in range(10)])
    with LLMClient.from_config(LLMConfig.model_validate(config), "r") as rerun:
        results = rerun.complete_many([ask(f"{i}") for i in range(10)])
    assert all(r.cached for r in results) and fake.calls == 10


def test_sync_facade_works_inside_a_running_event_loop(fake):
    async def stage_like() -> list:
        with LLMClient(role_for(fake)) as client:
            return client.complete_many([ask("a"), ask("b")])

    assert [r.text for r in asyncio.run(stage_like())] == ["echo: a", "echo: b"]


def test_async_api(fake):
    async def main() -> list:
        client = LLMClient(role_for(fake))
        try:
            return await client.acomplete_many([ask("a"), ask("b")])
        finally:
            await client.aclose()

    assert [r.text for r in asyncio.run(main())] == ["echo: a", "echo: b"]


def test_api_key_is_sent_but_never_logged_or_stored(fake, tmp_path, monkeypatch, caplog, capfd):
    secret = "sk-test-DO-NOT-LEAK-0123456789"
    monkeypatch.setenv("FAKE_LLM_KEY", secret)
    caplog.set_level(logging.DEBUG)
    logging.getLogger("openai").setLevel(logging.DEBUG)
    monkeypatch.setenv("OPENAI_LOG", "debug")
    fake.faults += [Fault.status_code(500), Fault.status_code(401), Fault.malformed()]
    cache = SqliteCache(tmp_path / "c.sqlite")
    role = role_for(fake, api_key_env="FAKE_LLM_KEY")
    with LLMClient(role, cache=cache) as client:
        results = [client.complete(ask(f"{i}")) for i in range(4)]
        text = repr(client.endpoints) + repr(results) + repr(client.stats())
    assert {k.lower(): v for k, v in fake.seen[0].headers.items()}["authorization"] == f"Bearer {secret}"
    out, err = capfd.readouterr()
    for where in (caplog.text, out, err, text, role.model_dump_json(), (tmp_path / "c.sqlite").read_bytes().decode(
            "latin-1")):
        assert secret not in where


def test_missing_key_variable_fails_when_the_client_is_built(fake, monkeypatch):
    monkeypatch.delenv("NOT_SET_KEY", raising=False)
    with pytest.raises(ValueError, match="NOT_SET_KEY"):
        LLMClient(role_for(fake, api_key_env="NOT_SET_KEY"))


def test_role_without_endpoints_says_what_to_do():
    with pytest.raises(NoEndpoint, match="llm_services"):
        LLMClient.from_config({}, "teacher")


def test_json_schema_is_translated_for_llama_cpp_endpoints(fake):
    schema = {"type": "object", "properties": {"t": {"enum": ["PER", "LOC"]}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}}
    with LLMClient(role_for(fake, json_schema_via="json_object")) as client:
        client.complete(ask("x", response_format=fmt))
    assert fake.seen[0].body["response_format"] == {"type": "json_object", "schema": schema}


def test_a_broken_cache_costs_a_request_not_the_record(fake):
    class Broken:
        def get(self, key):
            raise OSError("disk I/O error")

        def put(self, key, value):
            raise OSError("database or disk is full")

        def close(self):
            pass

    with LLMClient(role_for(fake), cache=Broken()) as client:
        res = client.complete(ask("x"))
    assert res.ok and res.text == "echo: x"
