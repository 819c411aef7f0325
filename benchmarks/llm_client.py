"""Benchmark: the LLM client's sustained throughput against a raw asyncio loop over the openai client, same server,
same concurrency; and the request cache's cost per lookup.

    python benchmarks/llm_client.py                       # real vLLM (tiny Qwen2, built into .cache/vllm if missing)
    python benchmarks/llm_client.py --server embedded     # the embedded llama.cpp server with SmolLM2
    python benchmarks/llm_client.py --server fake          # the in-process fake server in a child process: the
                                                          # client's own overhead, with a server that costs nothing
    python benchmarks/llm_client.py --server http://host:8000/v1 --model NAME

Raw and client runs alternate for ``--rounds`` rounds on distinct prompts (nothing is cached in the throughput runs:
the cache is off there, so both send every request); the medians are compared. Target: ratio >= 0.95. The CPU time
the benchmark process spends per request is printed too: on a busy machine it is steadier than wall-clock throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import openai

from gmner_pipeline.llm.cache import FileCache, SqliteCache, request_key
from gmner_pipeline.llm.client import LLMClient
from gmner_pipeline.llm.config import EndpointConfig, RoleConfig, SamplingConfig
from gmner_pipeline.llm.request import LLMRequest, LLMResult

log = logging.getLogger("benchmarks.llm_client")
REPO = Path(__file__).resolve().parents[1]


def prompts(round_no: int, kind: str, count: int) -> list[list[dict[str, Any]]]:
    return [[{"role": "user", "content": f"[{kind} {round_no}.{i}] Which entities are in: Obama met Merkel in Paris?"}]
            for i in range(count)]


async def run_raw(base_url: str, model: str, messages: list, concurrency: int, params: dict) -> tuple[float, int]:
    """The floor: AsyncOpenAI + a semaphore + gather, nothing else."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key="EMPTY", max_retries=0, timeout=300)
    sem = asyncio.Semaphore(concurrency)

    async def one(msgs: list) -> int:
        async with sem:
            resp = await client.chat.completions.create(model=model, messages=msgs, **params)
        return resp.usage.completion_tokens

    t0 = time.perf_counter()
    tokens = await asyncio.gather(*(one(m) for m in messages))
    elapsed = time.perf_counter() - t0
    await client.close()
    return elapsed, sum(tokens)


async def run_client(base_url: str, model: str, messages: list, concurrency: int, params: dict) -> tuple[float, int]:
    role = RoleConfig(endpoints=[EndpointConfig(base_url=base_url, model=model, max_concurrency=concurrency)],
                      sampling=SamplingConfig(temperature=params["temperature"], max_tokens=params["max_tokens"]),
                      timeout_s=300)
    client = LLMClient(role, cache=None)
    reqs = [LLMRequest(messages=m, seed=params.get("seed"), extra_body=params.get("extra_body")) for m in messages]
    t0 = time.perf_counter()
    results = await client.acomplete_many(reqs)
    elapsed = time.perf_counter() - t0
    await client.aclose()
    failed = [r.error for r in results if not r.ok]
    if failed:
        raise SystemExit(f"client requests failed: {failed[:3]}")
    return elapsed, sum(r.completion_tokens for r in results)


def cache_cost(n: int) -> dict[str, float]:
    """Microseconds per lookup: key hashing, sqlite/file hit and miss, and the whole cached client path."""
    out: dict[str, float] = {}
    msgs = prompts(0, "cache", n)
    params = {"n": 1, "seed": 0, "temperature": 0.0, "max_tokens": 32}
    t0 = time.perf_counter()
    keys = [request_key("model@rev", m, params) for m in msgs]
    out["key_us"] = (time.perf_counter() - t0) / n * 1e6
    value = LLMResult(model="m", prompt_tokens=20, completion_tokens=32).to_cache()
    value["choices"] = [{"text": "x" * 200, "finish_reason": "stop", "logprobs": None}]
    with tempfile.TemporaryDirectory() as tmp:
        for name, cache in (("sqlite", SqliteCache(Path(tmp) / "c.sqlite")), ("files", FileCache(Path(tmp) / "f"))):
            for k in keys:
                cache.put(k, value)
            t0 = time.perf_counter()
            for k in keys:
                cache.get(k)
            out[f"{name}_hit_us"] = (time.perf_counter() - t0) / n * 1e6
            t0 = time.perf_counter()
            for k in keys:
                cache.get(k[::-1])
            out[f"{name}_miss_us"] = (time.perf_counter() - t0) / n * 1e6
        # the whole client path for a cached request (no server needed: every request hits)
        role = RoleConfig(endpoints=[EndpointConfig(base_url="http://127.0.0.1:9/v1", model="model")],
                          revision="rev", sampling=SamplingConfig(max_tokens=32, seed=0))
        cache = SqliteCache(Path(tmp) / "c.sqlite")
        client = LLMClient(role, cache=cache)
        for m in msgs:
            cache.put(request_key(client.identity, m, client._params(LLMRequest(messages=m))), value)
        reqs = [LLMRequest(messages=m) for m in msgs]
        t0 = time.perf_counter()
        results = asyncio.run(client.acomplete_many(reqs))
        out["client_cached_request_us"] = (time.perf_counter() - t0) / n * 1e6
        assert all(r.cached for r in results)
    return out


class _FakeInChild:
    """FakeOpenAI in a child process, so that serving costs the measured process nothing."""

    def __init__(self) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        self.proc = ctx.Process(target=_serve_fake, args=(queue,), daemon=True)
        self.proc.start()
        self.port = queue.get(timeout=60)

    def stop(self) -> None:
        self.proc.kill()


def _serve_fake(queue: Any) -> None:
    from gmner_pipeline.testing import FakeOpenAI

    srv = FakeOpenAI(model="fake", completion_tokens=16).start()
    queue.put(srv.port)
    while True:
        time.sleep(3600)


def start_server(kind: str) -> tuple[Any, str, str, dict]:
    if kind == "fake":
        fake = _FakeInChild()
        return fake, f"http://127.0.0.1:{fake.port}/v1", "fake", {}
    if kind == "vllm":
        sys.path.insert(0, str(REPO / "tests"))  # the vLLM test server is a test helper, not part of the product
        from support.tiny_vllm import MODEL_NAME, ensure_vllm, start_vllm

        root = REPO / ".cache" / "vllm"
        ensure_vllm(root)
        srv = start_vllm(root)
        return srv, srv.base_url, MODEL_NAME, {"ignore_eos": True}  # fixed-length answers: equal work per request
    if kind == "embedded":
        from gmner_pipeline.llm.embedded import EmbeddedServer

        emb = EmbeddedServer().start()
        return emb, emb.endpoint().base_url, emb.config.model_name, {}
    raise SystemExit(f"unknown server {kind!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", default="vllm", help="vllm | embedded | an OpenAI-compatible base URL")
    ap.add_argument("--model", default=None, help="model name (with a URL)")
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--cache-lookups", type=int, default=5000)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    server = None
    if args.server.startswith("http"):
        base_url, model, extra = args.server.rstrip("/"), args.model or "default", {}
    else:
        server, base_url, model, extra = start_server(args.server)
    params: dict[str, Any] = {"temperature": 0.0, "max_tokens": args.max_tokens, "seed": 0}
    if extra:
        params["extra_body"] = extra
    raw_params = {k: v for k, v in params.items()}
    try:
        asyncio.run(run_raw(base_url, model, prompts(0, "warmup", args.concurrency), args.concurrency, raw_params))
        raw_rps, cli_rps, raw_tps, cli_tps = [], [], [], []
        cpu: dict[str, list[float]] = {"raw": [], "client": []}
        for r in range(args.rounds):
            for kind in (("raw", "client") if r % 2 == 0 else ("client", "raw")):
                fn = run_raw if kind == "raw" else run_client
                c0 = time.process_time()
                elapsed, tokens = asyncio.run(fn(base_url, model, prompts(r, kind, args.requests), args.concurrency,
                                                 raw_params))
                cpu[kind].append((time.process_time() - c0) / args.requests * 1000)
                (raw_rps if kind == "raw" else cli_rps).append(args.requests / elapsed)
                (raw_tps if kind == "raw" else cli_tps).append(tokens / elapsed)
                print(f"round {r} {kind:6s}: {args.requests / elapsed:7.2f} req/s  {tokens / elapsed:8.1f} tok/s  "
                      f"({elapsed:.2f} s, {cpu[kind][-1]:.2f} CPU-ms/request)", flush=True)
    finally:
        if server is not None:
            server.stop()
    ratio = statistics.median(cli_rps) / statistics.median(raw_rps)
    tok_ratio = statistics.median(cli_tps) / statistics.median(raw_tps)
    paired = statistics.median(c / r for c, r in zip(cli_rps, raw_rps))  # each round's pair ran back to back
    print(f"server={args.server} requests={args.requests} concurrency={args.concurrency} "
          f"max_tokens={args.max_tokens} rounds={args.rounds}")
    print(f"raw    median: {statistics.median(raw_rps):.2f} req/s, {statistics.median(raw_tps):.1f} tok/s")
    print(f"client median: {statistics.median(cli_rps):.2f} req/s, {statistics.median(cli_tps):.1f} tok/s")
    print(f"CPU per request in this process: raw {statistics.median(cpu['raw']):.2f} ms, "
          f"client {statistics.median(cpu['client']):.2f} ms")
    print(f"RATIO client/raw: requests/s {ratio:.3f}, tokens/s {tok_ratio:.3f}, median of per-round ratios "
          f"{paired:.3f} (target >= 0.95)")
    costs = cache_cost(args.cache_lookups)
    print("cache cost per lookup (us): " + ", ".join(f"{k}={v:.1f}" for k, v in costs.items()))
    sys.exit(0)


if __name__ == "__main__":
    main()
