"""distill: the stage's request throughput against a raw asyncio openai loop, and chains on Twitter-GMNER.

``throughput``: one vLLM server (the tiny random Qwen2 of tests/support, or ``--url``), one concurrency. Rounds
alternate between (a) the distill stage over N records (llm style, both routes, one chain, one attempt, caches off)
and (b) a minimal raw loop (``openai.AsyncOpenAI``, a semaphore, ``gather``) sending exactly the requests the stage
builds (``DistillStage.jobs``: same messages, n, seed, sampling). The stage also judges every answer; the raw loop
only receives it. Prints requests/s of both, per round and as medians, and their ratio (target >= 0.9).

``twitter``: the first ``--n`` Twitter-GMNER train tweets through distill with the embedded SmolLM2 teacher (the
offline default) and template + llm styles: chains per second, consistency rate per style, tokens per chain (and the
template style alone on ``--template-n`` tweets).

    python benchmarks/distill.py throughput --records 64 --concurrency 16 --rounds 4
    python benchmarks/distill.py twitter --data ../shared/data/twitter-gmner-v2 --n 20 --template-n 7000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # support.tiny_vllm


def tweets(n: int, data: Path | None) -> list[dict[str, Any]]:
    """Twitter-GMNER train records when ``data`` exists, else synthetic tweets of the same shape."""
    if data and (data / "txt" / "train.txt").is_file():
        from gmner_pipeline.ingest.twitter_gmner import read_twitter_gmner

        return [r for r in read_twitter_gmner(data, "train", limit=n) if r["status"] == "ok"][:n]
    from gmner_pipeline.schema import empty_record

    out = []
    for i in range(n):
        tokens = f"RT @ fan : Alice Smith meets the Red Cross team in Paris today #{i}".split()
        ents = [{"text": "Alice Smith", "start": 4, "end": 6, "type": "PER", "fine_type": None,
                 "boxes": [[10, 5, 50, 70]]},
                {"text": "Red Cross", "start": 8, "end": 10, "type": "ORG", "fine_type": None, "boxes": []},
                {"text": "Paris", "start": 12, "end": 13, "type": "LOC", "fine_type": None, "boxes": []}]
        out.append(empty_record(id=f"bench/train/{i}", source="bench", split="train", sample_key=str(i),
                                text=" ".join(tokens), tokens=tokens, entities=ents, grounding_labels="present",
                                image={"path": None, "uri": None, "sha256": None, "width": 100, "height": 80}))
    return out


# --- throughput ---------------------------------------------------------------------------------------------------------

def start_server(args: argparse.Namespace) -> tuple[Any, str, str]:
    if args.url:
        return None, args.url, args.model
    from support.tiny_vllm import MODEL_NAME, NO_SPLIT_PREFILL, ensure_long_model, start_vllm

    root = REPO / ".cache" / "vllm"
    ensure_long_model(root)
    server = start_vllm(root, max_model_len=2048, long=True, extra_args=NO_SPLIT_PREFILL)
    print(f"vLLM (tiny random Qwen2, CPU) ready after {server.started_s:.0f} s at {server.base_url}")
    return server, server.base_url, MODEL_NAME


def throughput(args: argparse.Namespace) -> None:
    import openai

    from gmner_pipeline.answer import gold_triples
    from gmner_pipeline.llm.services import llm_services
    from gmner_pipeline.stage import StageContext
    from gmner_pipeline.stages.distill import DistillConfig, DistillStage
    from gmner_pipeline.stages.distill.store import teacher_view
    from gmner_pipeline.stages.distill.variation import request_seed
    from gmner_pipeline.worker import run_batch, start_stage, stop_stage

    server, base_url, model = start_server(args)
    records = tweets(args.records, args.data)
    sampling = {"temperature": 0.0, "max_tokens": args.max_tokens, "seed": 0}
    llm = {"roles": {"teacher": {"endpoints": [{"base_url": base_url, "model": model,
                                                "max_concurrency": args.concurrency}],
                                 "sampling": sampling, "timeout_s": 600}},
           "cache": {"enabled": False}}
    config = DistillConfig(styles=["llm"], llm={"chains": 1, "max_attempts": 1}, reuse=False,
                           batch_size=len(records))
    try:
        with llm_services(llm, {"teacher"}) as resolved:
            stage = start_stage(DistillStage, config, StageContext(llm=resolved))
            plan = stage.teachers[0]
            requests = []
            for rec in records:
                view = teacher_view(rec, knowledge=True, detections=True)
                for job in stage.jobs(plan, view, tuple(gold_triples(rec)), False):
                    requests.append({"messages": job.base, "n": job.n, "seed": request_seed(job.seed)})
            print(f"{len(records)} records -> {len(requests)} requests per round, concurrency {args.concurrency}")

            async def raw_round() -> float:
                client = openai.AsyncOpenAI(base_url=base_url, api_key="EMPTY", max_retries=0, timeout=600)
                slots = asyncio.Semaphore(args.concurrency)

                async def one(req: dict[str, Any]) -> None:
                    async with slots:
                        await client.chat.completions.create(model=model, temperature=0.0,
                                                             max_tokens=args.max_tokens, **req)

                t0 = time.perf_counter()
                await asyncio.gather(*(one(r) for r in requests))
                seconds = time.perf_counter() - t0
                await client.close()
                return seconds

            run_batch(stage, records)  # warm-up (server compile paths, prefix cache, connections): not counted
            asyncio.run(raw_round())
            stage_rates, raw_rates, stage_cpu, raw_cpu = [], [], [], []
            for k in range(args.rounds):
                t0, c0 = time.perf_counter(), time.process_time()
                out = run_batch(stage, records)
                stage_s, stage_c = time.perf_counter() - t0, time.process_time() - c0
                judged = sum(len(r["cot"]["chains"]) for r in out)
                c0 = time.process_time()
                raw_s = asyncio.run(raw_round())
                raw_c = time.process_time() - c0
                stage_rates.append(len(requests) / stage_s)
                raw_rates.append(len(requests) / raw_s)
                stage_cpu.append(1000 * stage_c / len(requests))
                raw_cpu.append(1000 * raw_c / len(requests))
                print(f"round {k + 1}: stage {stage_rates[-1]:.2f} req/s ({judged} chains judged, "
                      f"{stage_cpu[-1]:.2f} CPU-ms/req), raw {raw_rates[-1]:.2f} req/s ({raw_cpu[-1]:.2f} CPU-ms/req),"
                      f" ratio {stage_rates[-1] / raw_rates[-1]:.3f}")
            stop_stage(stage)
        s, r = statistics.median(stage_rates), statistics.median(raw_rates)
        ratios = [a / b for a, b in zip(stage_rates, raw_rates)]
        print(f"median: stage {s:.2f} req/s, raw {r:.2f} req/s; ratio of medians {s / r:.3f}, "
              f"median of per-round ratios {statistics.median(ratios):.3f} (target >= 0.9); this process's CPU per "
              f"request: stage {statistics.median(stage_cpu):.2f} ms, raw {statistics.median(raw_cpu):.2f} ms")
    finally:
        if server is not None:
            server.stop()


# --- Twitter-GMNER with the embedded teacher ----------------------------------------------------------------------------

def twitter(args: argparse.Namespace) -> None:
    from gmner_pipeline.llm.services import llm_services
    from gmner_pipeline.stage import StageContext
    from gmner_pipeline.stages.distill import DistillConfig, DistillStage
    from gmner_pipeline.worker import run_batch, start_stage, stop_stage

    many = tweets(args.template_n, args.data)
    template_only = DistillConfig(styles=["template"], batch_size=len(many))
    stage = start_stage(DistillStage, template_only, StageContext())
    t0 = time.perf_counter()
    out = run_batch(stage, many)
    template_s = time.perf_counter() - t0
    stop_stage(stage)
    report(f"template alone, {len(many)} tweets", out, template_s, "template")

    records = many[:args.n]
    if not records:
        return
    print(f"{len(records)} Twitter-GMNER train tweets" if args.data else f"{len(records)} synthetic tweets")

    llm = {"roles": {"teacher": {"sampling": {"temperature": 0.7, "top_p": 0.95, "max_tokens": args.max_tokens,
                                              "seed": 0}, "timeout_s": 600}},
           "embedded": {"max_concurrency": 1}, "cache": {"enabled": False}}
    config = DistillConfig(styles=["template", "llm"], llm={"chains": 1, "max_attempts": args.attempts},
                           reuse=False, batch_size=len(records))
    with llm_services(llm, {"teacher"}) as resolved:
        stage = start_stage(DistillStage, config, StageContext(llm=resolved))
        t0 = time.perf_counter()
        out = run_batch(stage, records)
        seconds = time.perf_counter() - t0
        counters = stage.take_counters()
        stop_stage(stage)
    print(f"template + llm with the embedded SmolLM2-135M teacher: {seconds:.1f} s for {len(records)} records")
    for style in ("template", "llm"):
        report(style, out, seconds, style)
    print("counters:", dict(sorted(counters.items())))


def report(label: str, records: list[dict[str, Any]], seconds: float, style: str) -> None:
    chains = [c for r in records for c in (r.get("cot") or {}).get("chains") or [] if c["style"] == style]
    consistent = sum(1 for c in chains if c["consistent"])
    tokens = [(c.get("prompt_tokens") or 0) + (c.get("completion_tokens") or 0) for c in chains]
    reasons = Counter((c.get("rejection") or "").split(":")[0] for c in chains if not c["consistent"])
    print(f"  {label}: {len(chains)} chains, {len(chains) / seconds:.2f} chains/s (wall {seconds:.1f} s), "
          f"consistent {consistent}/{len(chains)} = {100 * consistent / max(len(chains), 1):.1f}%, "
          f"tokens/chain {statistics.mean(tokens) if tokens else 0:.0f} "
          f"(prompt {statistics.mean([c.get('prompt_tokens') or 0 for c in chains]) if chains else 0:.0f}), "
          f"rejections {dict(reasons)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--url", help="an OpenAI-compatible server (default: start the tiny vLLM CPU server)")
    t.add_argument("--model", default="tiny-qwen2")
    t.add_argument("--records", type=int, default=64)
    t.add_argument("--concurrency", type=int, default=16)
    t.add_argument("--rounds", type=int, default=4)
    t.add_argument("--max-tokens", type=int, default=32)
    t.add_argument("--data", type=Path, default=None, help="Twitter-GMNER folder (default: synthetic tweets)")
    w = sub.add_parser("twitter")
    w.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "twitter-gmner-v2")
    w.add_argument("--n", type=int, default=20, help="tweets through template + llm (the embedded teacher)")
    w.add_argument("--template-n", type=int, default=7000, help="tweets through the template style alone")
    w.add_argument("--max-tokens", type=int, default=96)
    w.add_argument("--attempts", type=int, default=1)
    args = parser.parse_args()
    throughput(args) if args.what == "throughput" else twitter(args)


if __name__ == "__main__":
    main()
