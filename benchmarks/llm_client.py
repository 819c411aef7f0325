"""Benchmark: the LLM client's sustained throughput against a raw asyncio loop over the openai client, same server,
same concurrency, same prompts; and the request cache's cost per lookup.

    python benchmarks/llm_client.py                       # real vLLM (tiny Qwen2, built into .cache/vllm if missing)
    python benchmarks/llm_client.py --server embedded     # the embedded llama.cpp server with SmolLM2
    python benchmarks/llm_client.py --server fake          # the in-process fake server in a child process: the
                                                          # client's own overhead, with a server that costs nothing
    python benchmarks/llm_client.py --server http://host:8000/v1 --model NAME

How the ratio is made conclusive on a shared, noisy machine:

* **Paired, interleaved rounds.** Each round runs raw and client back to back on fresh prompts (nothing is cached: the
  cache is off, both send every request), in ABBA order (raw-client, client-raw, ...), so drift in the machine's load
  hits both sides of a pair alike. The figure is the median of the per-round ratios client/raw, with its spread
  (quartiles, min, max) and a bootstrap 95% confidence interval of that median.
* **CPU time per request**, measured for this process (the client's whole cost: event loop, openai, ours) and for the
  server's process tree (a check that both sides asked for the same work). On a machine where the server and the
  client share the cores, throughput follows total CPU per request, so the CPU ratio raw/client is a steadier
  estimate of the same quantity.
* **Verdict**: "meets the target" when the lower end of the confidence interval is at least ``--target``, "below the
  target" when its upper end is below, otherwise "inconclusive: run more rounds".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import subprocess
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


async def run_window(kind: str, base_url: str, model: str, concurrency: int, params: dict, start_at: float,
                     window_s: float) -> dict[str, float]:
    """Closed loop for a fixed time window: ``concurrency`` workers send requests back to back from ``start_at`` (a
    wall-clock time shared with the other side) for ``window_s`` seconds; requests that complete inside the window
    count. ``kind``: raw (AsyncOpenAI) or client (LLMClient)."""
    if kind == "raw":
        raw = openai.AsyncOpenAI(base_url=base_url, api_key="EMPTY", max_retries=0, timeout=300)

        async def send(msgs: list) -> None:
            await raw.chat.completions.create(model=model, messages=msgs, **params)
    else:
        role = RoleConfig(endpoints=[EndpointConfig(base_url=base_url, model=model, max_concurrency=concurrency)],
                          sampling=SamplingConfig(temperature=params["temperature"], max_tokens=params["max_tokens"]),
                          timeout_s=300)
        llm = LLMClient(role, cache=None)

        async def send(msgs: list) -> None:
            result = await llm.acomplete(LLMRequest(messages=msgs, seed=params.get("seed"),
                                                    extra_body=params.get("extra_body")))
            if not result.ok:
                raise SystemExit(f"client request failed: {result.error}")

    await asyncio.sleep(max(0.0, start_at - time.time()))
    end = start_at + window_s
    done = 0

    async def worker(w: int) -> None:
        nonlocal done
        i = 0
        while time.time() < end:
            await send([{"role": "user", "content": f"[{kind} {start_at} {w}.{i}] Which entities are in: Obama met "
                                                    "Merkel in Paris?"}])
            i += 1
            if time.time() <= end:
                done += 1

    c0 = time.process_time()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    cpu = time.process_time() - c0
    if kind == "raw":
        await raw.close()
    else:
        await llm.aclose()
    return {"completed": done, "rps": done / window_s, "cpu_ms": cpu / max(done, 1) * 1000}


def window_child(args: argparse.Namespace) -> None:
    params = json.loads(args.params)
    out = asyncio.run(run_window(args.child, args.base_url, args.model, args.concurrency, params, args.start_at,
                                 args.window))
    print("WINDOW " + json.dumps(out), flush=True)


def simultaneous_round(r: int, base_url: str, model: str, concurrency: int, params: dict, window_s: float,
                       pair: tuple[str, str] = ("raw", "client")) -> dict[str, dict[str, float]]:
    """Raw and client in two processes, over the same time window against the same server: whatever else the
    machine does in that window, both sides live through it. ``pair`` says what the raw and the client side run:
    ``("raw", "raw")`` is the A/A check of the method itself (its ratio should be 1)."""
    start_at = time.time() + 3.0  # both children imported and connected by then
    kinds = ("raw", "client") if r % 2 == 0 else ("client", "raw")  # who starts first alternates
    runs_as = dict(zip(("raw", "client"), pair))
    procs = {k: subprocess.Popen([sys.executable, __file__, "--child", runs_as[k], "--base-url", base_url,
                                  "--model", model,
                                  "--concurrency", str(concurrency), "--params", json.dumps(params),
                                  "--start-at", repr(start_at), "--window", str(window_s)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in kinds}
    out = {}
    for k, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=window_s + 300)
        line = next((ln for ln in stdout.splitlines() if ln.startswith("WINDOW ")), None)
        if proc.returncode != 0 or line is None:
            raise SystemExit(f"{k} window run failed: {stderr[-2000:]}")
        out[k] = json.loads(line[len("WINDOW "):])
    return out


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


def start_server(kind: str, vllm_root: Path = REPO / ".cache" / "vllm") -> tuple[Any, str, str, dict]:
    if kind == "fake":
        fake = _FakeInChild()
        return fake, f"http://127.0.0.1:{fake.port}/v1", "fake", {}
    if kind == "vllm":
        sys.path.insert(0, str(REPO / "tests"))  # the vLLM test server is a test helper, not part of the product
        from support.tiny_vllm import MODEL_NAME, ensure_vllm, start_vllm

        ensure_vllm(vllm_root)
        srv = start_vllm(vllm_root)
        return srv, srv.base_url, MODEL_NAME, {"ignore_eos": True}  # fixed-length answers: equal work per request
    if kind == "embedded":
        from gmner_pipeline.llm.embedded import EmbeddedServer

        emb = EmbeddedServer().start()
        return emb, emb.endpoint().base_url, emb.config.model_name, {}
    raise SystemExit(f"unknown server {kind!r}")


def tree_cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of a process and its live descendants (the server: API process and engine core)."""
    if pid is None:
        return 0.0
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def server_pid(server: Any) -> int | None:
    for attr in ("proc", "process"):
        obj = getattr(server, attr, None)
        if obj is None:
            continue
        inner = getattr(obj, "proc", obj)  # EmbeddedServer.process is a ServerProcess, whose .proc is the Popen
        if getattr(inner, "pid", None):
            return inner.pid
    return None


def bootstrap_median_ci(values: list[float], level: float = 0.95, resamples: int = 10000) -> tuple[float, float]:
    import numpy as np

    rng = np.random.default_rng(0)
    data = np.asarray(values)
    medians = np.median(rng.choice(data, size=(resamples, len(data)), replace=True), axis=1)
    return float(np.quantile(medians, (1 - level) / 2)), float(np.quantile(medians, 1 - (1 - level) / 2))


def there_positive(runs: list[dict[str, float]]) -> bool:
    return statistics.median(x["server_cpu_ms"] for x in runs) > 0


def quartiles(values: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
    return q[0], q[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", default="vllm", help="vllm | embedded | fake | an OpenAI-compatible base URL")
    ap.add_argument("--model", default=None, help="model name (with a URL)")
    ap.add_argument("--requests", type=int, default=96, help="requests per run")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=20, help="paired rounds (each: one raw run and one client run)")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured rounds first")
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--cache-lookups", type=int, default=5000)
    ap.add_argument("--mode", choices=["sequential", "simultaneous", "both"], default="both",
                    help="sequential: raw and client runs one after the other (ABBA); simultaneous: both at once in "
                    "two processes over the same time window (see the module doc)")
    ap.add_argument("--window", type=float, default=8.0, help="seconds per simultaneous round")
    ap.add_argument("--pair", default="raw,client", help="what the two simultaneous sides run; raw,raw or "
                    "client,client is the A/A check of the method (its ratio should be 1)")
    ap.add_argument("--vllm-root", type=Path, default=REPO / ".cache" / "vllm",
                    help="where the vLLM CPU venv and the tiny model are (built there if missing)")
    ap.add_argument("--child", choices=["raw", "client"], help=argparse.SUPPRESS)
    ap.add_argument("--base-url", help=argparse.SUPPRESS)
    ap.add_argument("--params", help=argparse.SUPPRESS)
    ap.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        window_child(args)
        return
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    server = None
    if args.server.startswith("http"):
        base_url, model, extra = args.server.rstrip("/"), args.model or "default", {}
    else:
        server, base_url, model, extra = start_server(args.server, args.vllm_root)
    pid = server_pid(server) if server is not None else None
    params: dict[str, Any] = {"temperature": 0.0, "max_tokens": args.max_tokens, "seed": 0}
    if extra:
        params["extra_body"] = extra
    runs: dict[str, list[dict[str, float]]] = {"raw": [], "client": []}
    together: dict[str, list[dict[str, float]]] = {"raw": [], "client": []}
    try:
        for w in range(args.warmup):
            for kind, fn in (("raw", run_raw), ("client", run_client)):
                asyncio.run(fn(base_url, model, prompts(w, f"warmup-{kind}", args.requests), args.concurrency, params))
        if args.mode in ("sequential", "both"):
            for r in range(args.rounds):
                for kind in (("raw", "client") if r % 2 == 0 else ("client", "raw")):
                    fn = run_raw if kind == "raw" else run_client
                    c0, s0 = time.process_time(), tree_cpu_s(pid)
                    elapsed, tokens = asyncio.run(fn(base_url, model, prompts(r, kind, args.requests),
                                                     args.concurrency, params))
                    run = {"rps": args.requests / elapsed, "tps": tokens / elapsed,
                           "cpu_ms": (time.process_time() - c0) / args.requests * 1000,
                           "server_cpu_ms": (tree_cpu_s(pid) - s0) / args.requests * 1000}
                    runs[kind].append(run)
                    print(f"round {r:2d} {kind:6s}: {run['rps']:7.2f} req/s  {run['tps']:8.1f} tok/s  "
                          f"{run['cpu_ms']:.2f} CPU-ms/request here, {run['server_cpu_ms']:.2f} in the server",
                          flush=True)
        if args.mode in ("simultaneous", "both"):
            for r in range(args.rounds):
                pair = simultaneous_round(r, base_url, model, args.concurrency, params, args.window,
                                          tuple(args.pair.split(",")))
                for kind, res in pair.items():
                    together[kind].append(res)
                print(f"simultaneous round {r:2d}: raw {pair['raw']['rps']:6.2f} req/s "
                      f"({pair['raw']['cpu_ms']:.2f} CPU-ms/request), client {pair['client']['rps']:6.2f} req/s "
                      f"({pair['client']['cpu_ms']:.2f} CPU-ms/request)", flush=True)
    finally:
        if server is not None:
            server.stop()
    print(f"\nserver={args.server} requests={args.requests} concurrency={args.concurrency} "
          f"max_tokens={args.max_tokens} rounds={args.rounds} (+{args.warmup} warm-up) window={args.window} s")
    if runs["raw"]:
        report(args, runs, "sequential (ABBA) runs")
    if together["raw"]:
        report(args, together, f"simultaneous runs ({args.window:g} s windows, two processes)")
    costs = cache_cost(args.cache_lookups)
    print("cache cost per lookup (us): " + ", ".join(f"{k}={v:.1f}" for k, v in costs.items()))
    sys.exit(0)


def report(args: argparse.Namespace, runs: dict[str, list[dict[str, float]]], title: str) -> None:
    raw, cli = runs["raw"], runs["client"]
    med = lambda rs, k: statistics.median(x[k] for x in rs)  # noqa: E731
    ratios = [c["rps"] / r["rps"] for c, r in zip(cli, raw)]  # the two sides of a round ran back to back / together
    low, high = bootstrap_median_ci(ratios)
    q1, q3 = quartiles(ratios)
    print(f"-- {title}")
    print(f"raw    median: {med(raw, 'rps'):.2f} req/s; client median: {med(cli, 'rps'):.2f} req/s")
    print(f"RATIO client/raw requests/s, per-round pairs: median {statistics.median(ratios):.3f}, quartiles "
          f"{q1:.3f}-{q3:.3f}, min {min(ratios):.3f}, max {max(ratios):.3f}, 95% CI of the median {low:.3f}-{high:.3f}")
    here = (med(raw, "cpu_ms"), med(cli, "cpu_ms"))
    print(f"CPU per request in the sending process: raw {here[0]:.2f} ms, client {here[1]:.2f} ms (the client adds "
          f"{here[1] - here[0]:+.2f} ms)")
    added = [c["cpu_ms"] - r["cpu_ms"] for c, r in zip(cli, raw)]
    a_low, a_high = bootstrap_median_ci(added)
    print(f"  per-round pairs: the client adds {statistics.median(added):+.3f} ms (95% CI {a_low:+.3f} to "
          f"{a_high:+.3f} ms)")
    if "server_cpu_ms" in raw[0] and there_positive(raw):
        there = (med(raw, "server_cpu_ms"), med(cli, "server_cpu_ms"))
        print(f"CPU per request in the server: raw {there[0]:.2f} ms, client {there[1]:.2f} ms")
        cpu_ratios = [(r["cpu_ms"] + r["server_cpu_ms"]) / (c["cpu_ms"] + c["server_cpu_ms"]) for c, r in zip(cli, raw)]
        c_low, c_high = bootstrap_median_ci(cpu_ratios)
        print(f"RATIO by total CPU per request (raw/client, sender + server; what throughput follows when they share "
              f"the cores): median {statistics.median(cpu_ratios):.3f}, 95% CI {c_low:.3f}-{c_high:.3f}")
        # the sender's share is what the client can change; the server's work per request is the same on both sides
        own = [(r["cpu_ms"] + there[0]) / (c["cpu_ms"] + there[0]) for c, r in zip(cli, raw)]
        o_low, o_high = bootstrap_median_ci(own)
        print(f"RATIO by the sender's CPU alone, with the server's median cost on both sides: median "
              f"{statistics.median(own):.3f}, 95% CI {o_low:.3f}-{o_high:.3f}")
    if low >= args.target:
        verdict = f"meets the target (>= {args.target}): the whole 95% interval is above it"
    elif high < args.target:
        verdict = f"below the target ({args.target}): the whole 95% interval is under it"
    else:
        verdict = f"inconclusive against {args.target}: the interval straddles it; run more --rounds"
    print(f"VERDICT: {verdict}")


if __name__ == "__main__":
    main()
