"""Benchmark: the knowledge stage's table pass against a raw asyncio openai loop issuing the same requests, in one run,
against the same server at the same concurrency; tokens per entity per role; and how many calls the entity cache
saves on Twitter-GMNER train.

    python benchmarks/knowledge.py                          # real vLLM (tiny Qwen2, json_schema enforced)
    python benchmarks/knowledge.py --server fake            # a scripted fake server in a child process (costs
                                                            # nothing: the stage's own overhead, the worst case)
    python benchmarks/knowledge.py --server embedded --entities 6 --rounds 2   # SmolLM2 on llama.cpp (slow)
    python benchmarks/knowledge.py --data /path/to/twitter-gmner-v2            # real entity names + the ratio

Both paths do, per entity, N generator requests concurrently, then the voter, then the summary, with at most
``--in-flight`` entities at once and ``--concurrency`` requests in flight to the server. The stage path is the real
one: ``KnowledgeStage.compute_table`` (client, retries, accounting, the vote's checks). The raw path is
``openai.AsyncOpenAI`` + semaphores + the same pure prompt and parsing functions. Rounds alternate which path goes
first, each on entities of its own (no answer is reused: the request cache is off and prompts differ). Target:
stage/raw >= 0.9 in entities per second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import openai

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("benchmarks.knowledge")

GENERATORS = ["knowledge_gen_1", "knowledge_gen_2", "knowledge_gen_3"]


# --- the scripted fake server (a child process) -----------------------------------------------------------------------

def fake_reply(body: dict[str, Any]) -> str:
    """Generators state the first aspect; the voter keeps it with A and B; the summary is a sentence."""
    user = body["messages"][-1]["content"]
    if user.startswith("Entity: "):
        aspect = re.search(r"^- (\w+): ", user, re.M).group(1)
        return json.dumps({"fine_type": "x", "aspects": {aspect: "Tall, with a red logo on a white shirt."}})
    if "Merge them by meaning" in user:
        aspect = re.search(r"^(\w+):$", user, re.M).group(1)
        return json.dumps({"fine_type": "x", "aspects": [{"aspect": aspect, "support": ["A", "B"],
                                                          "text": "Tall, with a red logo on a white shirt."}]})
    return "Tall, with a red logo on a white shirt."


def _serve_fake(queue: Any, delay_s: float) -> None:
    from gmner_pipeline.testing import FakeOpenAI

    srv = FakeOpenAI(model="fake", completion_tokens=24, reply=fake_reply, delay_s=delay_s).start()
    queue.put(srv.port)
    while True:
        time.sleep(3600)


class _FakeInChild:
    def __init__(self, delay_s: float) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        self.proc = ctx.Process(target=_serve_fake, args=(queue, delay_s), daemon=True)
        self.proc.start()
        self.port = queue.get(timeout=60)

    def stop(self) -> None:
        self.proc.kill()


def start_server(kind: str, delay_s: float) -> tuple[Any, str, str, dict[str, Any]]:
    """(handle, base_url, model, endpoint extras)."""
    if kind == "fake":
        fake = _FakeInChild(delay_s)
        return fake, f"http://127.0.0.1:{fake.port}/v1", "fake", {}
    if kind == "vllm":
        sys.path.insert(0, str(REPO / "tests"))  # the vLLM test server is a test helper, not part of the product
        from support.tiny_vllm import MODEL_NAME, NO_SPLIT_PREFILL, ensure_long_model, start_vllm

        root = REPO / ".cache" / "vllm"
        ensure_long_model(root)
        # the stage's prompts need ~1,000 tokens: the 4k-position build, served with a 2,048-token context
        srv = start_vllm(root, max_model_len=2048, long=True, extra_args=NO_SPLIT_PREFILL)
        return srv, srv.base_url, MODEL_NAME, {}
    if kind == "embedded":
        from gmner_pipeline.llm.embedded import EmbeddedServer

        emb = EmbeddedServer().start()
        return emb, emb.endpoint().base_url, emb.config.model_name, {"json_schema_via": "json_object"}
    raise SystemExit(f"unknown server {kind!r}")


# --- entities --------------------------------------------------------------------------------------------------------

def read_train(data: Path) -> list[dict[str, Any]]:
    from gmner_pipeline.config import TwitterGmnerSource
    from gmner_pipeline.ingest import read_source

    return list(read_source(TwitterGmnerSource(path=str(data), splits=["train"]), Path(tempfile.gettempdir())))


def unique_ratio(records: list[dict[str, Any]], n_generators: int) -> dict[str, Any]:
    """Entity mentions vs unique (entity, type) pairs (exact and case-folded), and the calls the entity cache saves
    (each saved mention would have cost N generator calls, a vote and a summary)."""
    from gmner_pipeline.stages.knowledge.stage import entity_key, mentions

    mentions_n = 0
    exact: set[str] = set()
    folded: set[str] = set()
    for rec in records:
        for text, type_ in mentions(rec, None):
            mentions_n += 1
            exact.add(entity_key(text, type_, "exact"))
            folded.add(entity_key(text, type_, "casefold"))
    per_entity = n_generators + 2
    return {"records": len(records), "mentions": mentions_n, "unique_exact": len(exact),
            "unique_casefold": len(folded), "calls_without_cache": mentions_n * per_entity,
            "calls_with_cache": len(exact) * per_entity,
            "saved_share": 1 - len(exact) / mentions_n if mentions_n else 0.0}


def entity_items(names: list[tuple[str, str]]) -> dict[str, dict[str, Any]]:
    from gmner_pipeline.stages.knowledge.stage import entity_key

    return {entity_key(n, t, "exact"): {"entity": n, "type": t, "record_id": f"bench/{i}", "source": "gold",
                                        "context": f"{n} was in the news today", "in_sentence": True}
            for i, (n, t) in enumerate(names)}


# --- the two paths ---------------------------------------------------------------------------------------------------

def stage_config(args: argparse.Namespace) -> dict[str, Any]:
    return {"generators": GENERATORS[:args.generators], "max_aspects": args.max_aspects,
            "generator_max_tokens": args.max_tokens, "voter_max_tokens": args.max_tokens,
            "summary_max_tokens": args.summary_tokens, "entities_in_flight": args.in_flight}


def llm_config(base_url: str, model: str, extra: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    endpoint = {"base_url": base_url, "model": model, "max_concurrency": args.concurrency, **extra}
    roles = {r: {"endpoints": [endpoint], "model_id": f"{model}-{r}", "timeout_s": 600,
                 "sampling": {"temperature": 0.0, "seed": i}}
             for i, r in enumerate([*GENERATORS[:args.generators], "knowledge_voter", "knowledge_summary"])}
    return {"roles": roles, "cache": {"enabled": False}}


def run_stage_path(items: dict[str, dict[str, Any]], cfg: dict[str, Any], llm: dict[str, Any]) -> tuple[float, dict]:
    from gmner_pipeline.llm.config import LLMConfig
    from gmner_pipeline.stage import StageContext
    from gmner_pipeline.stages.knowledge import KnowledgeConfig, KnowledgeStage
    from gmner_pipeline.worker import start_stage, stop_stage

    stage = start_stage(KnowledgeStage, KnowledgeConfig(**cfg), StageContext(llm=LLMConfig(**llm)))
    try:
        t0 = time.perf_counter()
        values = stage.compute_table(items)
        return time.perf_counter() - t0, values
    finally:
        stop_stage(stage)


async def _raw(items: dict[str, dict[str, Any]], cfg: dict[str, Any], llm: dict[str, Any]) -> tuple[float, int]:
    """The floor: AsyncOpenAI, two semaphores, gather; the same prompts, schemas and parsing as the stage."""
    from gmner_pipeline.answer import close_json, parse_json_object
    from gmner_pipeline.stages.knowledge import KnowledgeConfig
    from gmner_pipeline.stages.knowledge.prompts import (generator_messages, generator_schema, json_format,
                                                         load_template, summary_messages, voted_text,
                                                         voter_messages, voter_schema)
    from gmner_pipeline.stages.knowledge.vote import (GeneratorAnswer, check_vote, compile_non_answers,
                                                      read_generator, required_support)

    kc = KnowledgeConfig(**cfg)
    non_answers = compile_non_answers(kc.non_answers)
    roles = llm["roles"]
    endpoint = roles[kc.voter]["endpoints"][0]
    client = openai.AsyncOpenAI(base_url=endpoint["base_url"], api_key="EMPTY", max_retries=0, timeout=600)
    requests = asyncio.Semaphore(endpoint["max_concurrency"])
    entities = asyncio.Semaphore(kc.entities_in_flight)
    as_object = endpoint.get("json_schema_via") == "json_object"

    sent = [0]

    async def call(role: str, messages: list, max_tokens: int, schema: dict | None) -> tuple[str, bool]:
        fmt = None
        if schema is not None:
            fmt = ({"type": "json_object", "schema": schema["json_schema"]["schema"]} if as_object else schema)
        params = {"temperature": 0.0, "seed": roles[role]["sampling"]["seed"], "max_tokens": max_tokens}
        if fmt is not None:
            params["response_format"] = fmt
        async with requests:
            resp = await client.chat.completions.create(model=endpoint["model"], messages=messages, **params)
        sent[0] += 1
        return resp.choices[0].message.content or "", resp.choices[0].finish_reason == "length"

    async def one(item: dict[str, Any]) -> None:
        async with entities:
            mapping = kc.type_map[item["type"]]
            template = load_template(mapping.template_name, kc.max_aspects)
            allowed = mapping.fine_types()
            msgs = generator_messages(item["entity"], template, allowed, item["context"],
                                      max_entity_chars=kc.max_entity_chars, max_context_chars=kc.max_context_chars)
            texts = await asyncio.gather(*(call(r, msgs, kc.generator_max_tokens,
                                                json_format("entity_knowledge", generator_schema(template, allowed)))
                                           for r in kc.generators))
            answers = [read_generator(GeneratorAnswer(r, label, "m", t), template.aspect_names, allowed, non_answers,
                                      truncated=cut) for r, label, (t, cut) in zip(kc.generators, "ABC", texts)]
            usable = [a for a in answers if a.ok]
            if len(usable) < kc.min_generators or not any(a.aspects for a in usable):
                return
            required = required_support(len(usable), kc.agreement, kc.min_support)
            if not any(sum(n in a.aspects for a in usable) >= required for n in template.aspect_names):
                return
            vote_text, cut = await call(kc.voter, voter_messages(
                item["entity"], template, [(a.label, a.fine_type_raw, a.aspects) for a in usable], required,
                max_entity_chars=kc.max_entity_chars, max_answer_chars=kc.max_answer_chars), kc.voter_max_tokens,
                json_format("knowledge_vote", voter_schema(template, [a.label for a in usable])))
            obj, _ = parse_json_object(vote_text)
            if obj is None and cut:
                obj, _ = parse_json_object(close_json(vote_text))
            if obj is None:
                return
            vote = check_vote(obj, usable, template.aspect_names, required, non_answers, kc.min_overlap)
            if vote.kept:
                await call(kc.summary, summary_messages(item["entity"], template, voted_text(
                    [(a, t) for a, t, _ in vote.kept]), kc.summary_words, max_entity_chars=kc.max_entity_chars),
                    kc.summary_max_tokens, None)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(item) for item in items.values()))
    elapsed = time.perf_counter() - t0
    await client.close()
    return elapsed, sent[0]


def tokens_per_role(values: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean prompt / completion tokens per call of each role (generators pooled), over the entities that made it."""
    calls: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for value in values.values():
        for t in value["tokens"]:
            role = "generator" if t["role"] in GENERATORS else t["role"].removeprefix("knowledge_")
            calls[role].append((t["prompt_tokens"], t["completion_tokens"]))
    return {role: {"calls": len(v), "prompt": statistics.mean(p for p, _ in v),
                   "completion": statistics.mean(c for _, c in v)} for role, v in calls.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", default="vllm", help="vllm | fake | embedded | an OpenAI-compatible base URL")
    ap.add_argument("--model", default=None, help="model name (with a URL)")
    ap.add_argument("--data", type=Path, default=None, help="Twitter-GMNER folder: real entity names and the "
                    "unique-entity ratio of its train split")
    ap.add_argument("--entities", type=int, default=24, help="entities per path and round")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--generators", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=16, help="requests in flight to the server (both paths)")
    ap.add_argument("--in-flight", type=int, default=16, help="entities worked on at once (both paths)")
    ap.add_argument("--max-aspects", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=96, help="generator and voter max_tokens")
    ap.add_argument("--summary-tokens", type=int, default=48)
    ap.add_argument("--delay", type=float, default=0.02, help="fake server: seconds per request")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    names: list[tuple[str, str]] = [(f"Person {i}", "PER") for i in range(4000)]
    if args.data:
        records = read_train(args.data)
        ratio = unique_ratio(records, args.generators)
        print("Twitter-GMNER train: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                                   for k, v in ratio.items()), flush=True)
        from gmner_pipeline.stages.knowledge.stage import mentions

        names = list(dict.fromkeys(m for r in records for m in mentions(r, None)))
    needed = 2 * args.rounds * args.entities + args.entities
    if len(names) < needed:
        raise SystemExit(f"need {needed} distinct entities, have {len(names)}: lower --entities or --rounds")

    server = None
    if args.server.startswith("http"):
        base_url, model, extra = args.server.rstrip("/"), args.model or "default", {}
    else:
        server, base_url, model, extra = start_server(args.server, args.delay)
    cfg, llm = stage_config(args), llm_config(base_url, model, extra, args)
    chunks = iter(names[i:i + args.entities] for i in range(0, needed, args.entities))
    rates: dict[str, list[float]] = {"stage": [], "raw": []}
    cpu: dict[str, list[float]] = {"stage": [], "raw": []}
    all_values: dict[str, Any] = {}
    requests = {"stage": 0, "raw": 0}
    try:
        run_stage_path(entity_items(next(chunks)), cfg, llm)  # warm-up (server caches, imports)
        for r in range(args.rounds):
            for kind in (("raw", "stage") if r % 2 == 0 else ("stage", "raw")):
                items = entity_items(next(chunks))
                c0 = time.process_time()
                if kind == "stage":
                    elapsed, values = run_stage_path(items, cfg, llm)
                    all_values.update(values)
                    sent = sum(len(v["tokens"]) for v in values.values())
                else:
                    elapsed, sent = asyncio.run(_raw(items, cfg, llm))
                cpu[kind].append((time.process_time() - c0) / len(items) * 1000)
                rates[kind].append(len(items) / elapsed)
                requests[kind] += sent
                print(f"round {r} {kind:5s}: {len(items) / elapsed:7.2f} entities/s ({elapsed:.2f} s, {sent} "
                      f"requests, {cpu[kind][-1]:.1f} CPU-ms/entity)", flush=True)
    finally:
        if server is not None:
            server.stop()
    med = {k: statistics.median(v) for k, v in rates.items()}
    paired = statistics.median(s / r for s, r in zip(rates["stage"], rates["raw"]))
    statuses: dict[str, int] = defaultdict(int)
    for v in all_values.values():
        statuses[v["status"]] += 1
    print(f"server={args.server} entities={args.entities} rounds={args.rounds} generators={args.generators} "
          f"concurrency={args.concurrency} in_flight={args.in_flight} max_tokens={args.max_tokens}")
    print(f"entity outcomes (stage path): {dict(statuses)}; requests sent: stage {requests['stage']}, "
          f"raw {requests['raw']}")
    print(f"raw   median: {med['raw']:.2f} entities/s, {statistics.median(cpu['raw']):.1f} CPU-ms/entity")
    print(f"stage median: {med['stage']:.2f} entities/s, {statistics.median(cpu['stage']):.1f} CPU-ms/entity")
    print(f"RATIO stage/raw: {med['stage'] / med['raw']:.3f} (of medians), {paired:.3f} (median of per-round "
          f"ratios); target >= 0.9")
    for role, t in tokens_per_role(all_values).items():
        print(f"tokens per {role} call: {t['prompt']:.0f} prompt + {t['completion']:.0f} completion = "
              f"{t['prompt'] + t['completion']:.0f} ({t['calls']} calls)")


if __name__ == "__main__":
    main()
