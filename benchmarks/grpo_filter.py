"""Benchmark: grpo_filter's sampling throughput against the raw engine, in one run.

    python benchmarks/grpo_filter.py served          # vLLM CPU: the tiny Qwen2 + a random LoRA adapter served as
                                                     # "policy" (built into .cache/vllm if missing)
    python benchmarks/grpo_filter.py served --server http://host:8000/v1 --model policy
    python benchmarks/grpo_filter.py local           # the in-process sampler vs plain model.generate
    python benchmarks/grpo_filter.py local --model path/to/model-or.gguf [--adapter DIR]

**served**: the stage (``run_stage``: prompt building, the LLM client, rewards, statistics, the grpo column; its
default batch of 64 records) against the floor, a raw ``AsyncOpenAI`` + semaphore + ``gather`` loop sending the SAME
requests (same messages, n = G, seeds, temperature, top-k in the extra body, top-p, max tokens: so the engine does
the same work) at the same concurrency. Rounds alternate; medians are compared. Target: ratio >= 0.9.

**local**: ``LocalPolicySampler.sample`` (the trainer's in-process sampler, which the stage's local path calls)
against plain ``model.generate`` on the same tokenised prompts with the same sampling settings; generated tokens
per second (tokens up to and including EOS; padding after it not counted). Default model: SmolLM2-135M-Instruct from
the embedded server's GGUF (dequantised by transformers), with a random LoRA adapter.

The CPU time of the benchmark process per record is printed too: on a busy machine it is steadier than wall time.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the vLLM test server and the toy records are test helpers

log = logging.getLogger("benchmarks.grpo_filter")


def records(n: int, tag: str) -> list[dict[str, Any]]:
    from support.grpo import d2_record

    return [d2_record(f"{tag}-{i}") for i in range(n)]


# --- served ----------------------------------------------------------------------------------------------------------

def stage_config(args: argparse.Namespace) -> dict[str, Any]:
    return {"samples": args.samples, "max_tokens": args.max_tokens, "prompt": {"image": False},
            "batch_size": args.batch_size}


def run_stage_once(base_url: str, model: str, recs: list[dict], args: argparse.Namespace) -> tuple[float, int]:
    from gmner_pipeline.stages.grpo_filter import GrpoFilterStage
    from gmner_pipeline.testing import run_stage

    llm = {"roles": {"policy": {"endpoints": [{"base_url": base_url, "model": model,
                                               "max_concurrency": args.concurrency}], "timeout_s": 600}},
           "cache": {"enabled": False}}
    t0 = time.perf_counter()
    out = run_stage(GrpoFilterStage, recs, config=stage_config(args), llm=llm)
    elapsed = time.perf_counter() - t0
    bad = [r["error"] for r in out if r["status"] != "ok"]
    if bad:
        raise SystemExit(f"stage records failed: {bad[:3]}")
    return elapsed, sum(r["lineage"][-1]["completion_tokens"] for r in out)


def raw_requests(recs: list[dict], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Exactly the bodies the stage sends (same builder, same seeds)."""
    from gmner_pipeline import student
    from gmner_pipeline.stages.grpo_filter.policy import ServedPolicy
    from gmner_pipeline.stages.grpo_filter.stage import GrpoFilterStageConfig, record_seed

    cfg = GrpoFilterStageConfig.model_validate(stage_config(args))
    policy = ServedPolicy(None, student.StudentPromptConfig.model_validate(cfg.prompt), cfg.sampling())  # type: ignore
    bodies = []
    for rec in recs:
        req = policy.request(policy.prepare(student.build_messages(rec, policy.prompt)),
                             record_seed(0, cfg.seed, rec["id"]))
        bodies.append({"messages": req.messages, "n": req.n, "seed": req.seed, "temperature": req.temperature,
                       "top_p": req.top_p, "max_tokens": req.max_tokens, "extra_body": {"top_k": req.top_k}})
    return bodies


async def run_raw(base_url: str, model: str, bodies: list[dict], concurrency: int) -> tuple[float, int]:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="EMPTY", max_retries=0, timeout=600)
    sem = asyncio.Semaphore(concurrency)

    async def one(body: dict) -> int:
        async with sem:
            resp = await client.chat.completions.create(model=model, **body)
        return resp.usage.completion_tokens

    t0 = time.perf_counter()
    tokens = await asyncio.gather(*(one(b) for b in bodies))
    elapsed = time.perf_counter() - t0
    await client.close()
    return elapsed, sum(tokens)


def served(args: argparse.Namespace) -> None:
    server = None
    if args.server:
        base_url, model = args.server.rstrip("/"), args.model or "policy"
    else:
        from support.tiny_vllm import NO_SPLIT_PREFILL, ensure_long_model, ensure_lora_adapter, start_vllm

        root = REPO / ".cache" / "vllm"
        ensure_long_model(root)
        adapter = ensure_lora_adapter(root)
        if adapter is None:
            raise SystemExit("peft is needed to build the random LoRA adapter: pip install -e '.[train]'")
        server = start_vllm(root, lora={"policy": adapter}, max_model_len=2048, long=True, extra_args=NO_SPLIT_PREFILL)
        base_url, model = server.base_url, "policy"
        print(f"vLLM (tiny Qwen2 + LoRA 'policy') ready in {server.started_s:.0f} s", flush=True)
    rates: dict[str, list[float]] = {"raw": [], "stage": []}
    toks: dict[str, list[float]] = {"raw": [], "stage": []}
    cpu: dict[str, list[float]] = {"raw": [], "stage": []}
    try:
        asyncio.run(run_raw(base_url, model, raw_requests(records(4, "warmup"), args), args.concurrency))
        for r in range(args.rounds):
            for kind in (("raw", "stage") if r % 2 == 0 else ("stage", "raw")):
                recs = records(args.records, f"{kind}{r}")  # distinct prompts: no prefix-cache help across runs
                c0 = time.process_time()
                if kind == "raw":
                    elapsed, tokens = asyncio.run(run_raw(base_url, model, raw_requests(recs, args), args.concurrency))
                else:
                    elapsed, tokens = run_stage_once(base_url, model, recs, args)
                cpu[kind].append((time.process_time() - c0) / args.records * 1000)
                rates[kind].append(args.records / elapsed)
                toks[kind].append(tokens / elapsed)
                print(f"round {r} {kind:5s}: {args.records / elapsed:6.2f} records/s  {tokens / elapsed:8.1f} tok/s "
                      f"({elapsed:.1f} s, {cpu[kind][-1]:.1f} CPU-ms/record)", flush=True)
    finally:
        if server is not None:
            server.stop()
    ratio = statistics.median(rates["stage"]) / statistics.median(rates["raw"])
    tok_ratio = statistics.median(toks["stage"]) / statistics.median(toks["raw"])
    print(f"records={args.records} G={args.samples} max_tokens={args.max_tokens} concurrency={args.concurrency} "
          f"batch_size={args.batch_size} rounds={args.rounds}")
    paired = statistics.median(s / r for s, r in zip(rates["stage"], rates["raw"]))  # each pair ran back to back
    print(f"stage/raw records/s (median): {ratio:.3f}   tokens/s: {tok_ratio:.3f}   median of paired rounds: "
          f"{paired:.3f}   target >= 0.9")
    print(f"CPU-ms per record in this process: stage {statistics.median(cpu['stage']):.1f}, "
          f"raw {statistics.median(cpu['raw']):.1f}")


# --- local -----------------------------------------------------------------------------------------------------------

def default_model() -> str:
    """SmolLM2-135M-Instruct's GGUF, found (or fetched) the way the embedded server finds it."""
    from gmner_pipeline.llm.config import EmbeddedConfig
    from gmner_pipeline.llm.embedded import locate_model

    return str(locate_model(EmbeddedConfig()))


def random_adapter(model: Any, folder: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    peft_model.save_pretrained(folder)
    return folder


def count_generated(sequences: Any, prompt_len: int, pad_id: int, eos_id: int | None) -> int:
    """Generated tokens up to and including the first EOS of each sequence (padding after it not counted)."""
    new = sequences[:, prompt_len:].tolist()
    total = 0
    for row in new:
        n = 0
        for tok in row:
            n += 1
            if tok == eos_id or (eos_id is None and tok == pad_id):
                break
        total += n
    return total


def local(args: argparse.Namespace) -> None:
    import torch

    from gmner_pipeline import student
    from gmner_pipeline.train.collate import hf_messages, render
    from gmner_pipeline.train.sampler import LocalPolicySampler

    model_path = args.model or default_model()
    with tempfile.TemporaryDirectory() as tmp:
        adapter = args.adapter
        if adapter is None and not args.no_adapter:
            from gmner_pipeline.train.config import ModelSpec
            from gmner_pipeline.train.models import load_policy

            adapter = str(random_adapter(load_policy(ModelSpec(name_or_path=model_path)).model, Path(tmp) / "lora"))
        t0 = time.perf_counter()
        sampler = LocalPolicySampler(model_path, adapter, device=args.device, dtype="float32",
                                     prompt={"image": False}, batch_size=args.batch_size)
        print(f"loaded {model_path} (+{'adapter' if adapter else 'no adapter'}) in {time.perf_counter() - t0:.1f} s",
              flush=True)
        tok = sampler.policy.tokenizer
        eos = sampler.policy.model.generation_config.eos_token_id
        eos = eos[0] if isinstance(eos, list) else eos
        counted: list[int] = []
        real_generate = sampler.policy.model.generate

        def counting_generate(**kwargs: Any) -> Any:  # what the sampler generated, counted like the plain loop
            out = real_generate(**kwargs)
            counted.append(count_generated(out, kwargs["input_ids"].shape[1], tok.pad_token_id, eos))
            return out

        sampler.policy.model.generate = counting_generate  # type: ignore[method-assign]
        prompts = [student.build_messages(r, sampler.prompt) for r in records(args.records, "local")]
        kwargs = dict(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                      num_return_sequences=args.samples, max_new_tokens=args.max_tokens, pad_token_id=tok.pad_token_id)

        def plain() -> tuple[float, int]:
            total, t0 = 0, time.perf_counter()
            for b, start in enumerate(range(0, len(prompts), args.batch_size)):
                texts = [render(sampler.policy.processor, hf_messages(m, sampler.prompt, False)[0], None)[0]
                         for m in prompts[start:start + args.batch_size]]
                inputs = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(sampler.device)
                torch.manual_seed(b)
                with torch.inference_mode():
                    out = real_generate(**inputs, **kwargs)
                total += count_generated(out, inputs["input_ids"].shape[1], tok.pad_token_id, eos)
            return time.perf_counter() - t0, total

        def through_sampler() -> tuple[float, int]:
            counted.clear()
            t0 = time.perf_counter()
            sampler.sample(prompts, n=args.samples, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, max_new_tokens=args.max_tokens, seed=0)
            return time.perf_counter() - t0, sum(counted)

        rates: dict[str, list[float]] = {"plain": [], "sampler": []}
        for r in range(args.rounds):
            for kind in (("plain", "sampler") if r % 2 == 0 else ("sampler", "plain")):
                elapsed, tokens = plain() if kind == "plain" else through_sampler()
                rates[kind].append(tokens / elapsed)
                print(f"round {r} {kind:7s}: {tokens / elapsed:8.1f} tok/s ({tokens} tokens, {elapsed:.1f} s)",
                      flush=True)
    ratio = statistics.median(rates["sampler"]) / statistics.median(rates["plain"])
    paired = statistics.median(s / p for s, p in zip(rates["sampler"], rates["plain"]))
    print(f"records={args.records} G={args.samples} max_new_tokens={args.max_tokens} batch_size={args.batch_size} "
          f"device={sampler.device} rounds={args.rounds}")
    print(f"sampler/plain generate tokens/s (median): {ratio:.3f}   median of paired rounds: {paired:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["served", "local"])
    ap.add_argument("--server", default=None, help="served: an OpenAI-compatible base URL (default: start vLLM)")
    ap.add_argument("--model", default=None, help="served: the policy's model name; local: model folder or .gguf")
    ap.add_argument("--adapter", default=None, help="local: a PEFT adapter folder (default: a random one)")
    ap.add_argument("--no-adapter", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--records", type=int, default=128)
    ap.add_argument("--samples", type=int, default=8, help="G")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=16, help="served: requests in flight (each with n = G)")
    ap.add_argument("--batch-size", type=int, default=64, help="served: the stage's batch; local: prompts per call")
    ap.add_argument("--temperature", type=float, default=1.5)
    ap.add_argument("--top-k", type=int, default=200)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    served(args) if args.mode == "served" else local(args)


if __name__ == "__main__":
    main()
