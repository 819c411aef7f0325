"""A bounded soak run under chaos: an LLM stage on Ray against real llama.cpp replicas (SmolLM2) behind one role,
while a chaos thread keeps breaking things: kill -9 a replica (restarted on its port a while later), SIGSTOP one past
the request timeout (then SIGCONT), kill a stage worker. At the end: requests, retries, failovers, errors, records/s,
what the chaos did, and whether every record came out exactly once and answered.

    python benchmarks/chaos_soak.py                         # 120 records, chaos for up to 120 s (a few minutes here)
    python benchmarks/chaos_soak.py --records 600 --chaos-seconds 600 --period 6

Chaos stops after ``--chaos-seconds`` (the bound); the run then finishes undisturbed. Never more than one replica is
down or stopped at a time, so the run can always make progress. The Ray instance is the run's own (a local one), and
only its workers are killed.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ASK = "gmner_pipeline.testing.stages:AskTeacherStage"
WORDS = ["Alice", "Bob", "Paris", "Berlin", "visits", "loves", "the", "river", "museum", "game", "today", "again"]


def distinct_source(dst: Path, n: int) -> Path:
    """A Twitter-GMNER folder whose tweets all differ (the LLM cache must not answer them)."""
    (dst / "txt").mkdir(parents=True, exist_ok=True)
    (dst / "xml").mkdir(parents=True, exist_ok=True)
    rng = random.Random(n)
    lines = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(5)] + [f"#{i}"]
        lines += [f"IMGID:{i}", f"{words[0]}\tB-PER", *(f"{w}\tO" for w in words[1:]), ""]
    (dst / "txt" / "train.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dst


def config(work: Path, records: int, endpoints: list[dict], timeout_s: float, pool: int):
    from gmner_pipeline.config import load_config

    data = distinct_source(work / "data", records)
    teacher = {"endpoints": endpoints, "model_id": "smollm2-soak", "timeout_s": timeout_s, "connect_timeout_s": 1.0,
               "sampling": {"max_tokens": 4, "temperature": 0.0},
               "retry": {"max_attempts": 200, "initial_backoff_s": 0.2, "max_backoff_s": 2.0, "jitter_s": 0.2,
                         "max_total_s": 600},
               "circuit": {"failure_threshold": 2, "cooldown_s": 1.0, "max_cooldown_s": 4.0}}
    stage = {"batch_size": 4, "resources": {"num_cpus": 0.5, "pool_size": pool, "max_in_flight": 1}}
    return load_config(None, [
        f"run.output_dir={work / 'out'}", "run.shard_size=8", "run.progress=false",
        f"source={{kind: twitter_gmner, path: {data}}}", f"pipeline=['{ASK}']",
        f"stages[{ASK}]=" + json.dumps(stage),
        "llm=" + json.dumps({"roles": {"teacher": teacher}, "cache": {"path": str(work / "llm-cache.sqlite")}})])


class Chaos(threading.Thread):
    """One random fault every ``period`` seconds until ``until`` (monotonic) or ``stop``."""

    def __init__(self, replicas, period: float, until: float, timeout_s: float, seed: int):
        super().__init__(daemon=True)
        self.replicas, self.period, self.until, self.timeout_s = replicas, period, until, timeout_s
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.log: list[tuple[float, str, str]] = []  # (seconds since start, fault, what happened)
        self.t0 = time.monotonic()

    def note(self, fault: str, what: str) -> None:
        self.log.append((round(time.monotonic() - self.t0, 1), fault, what))
        print(f"  [{self.log[-1][0]:6.1f} s] {what}", flush=True)

    def run(self) -> None:
        from gmner_pipeline.testing.chaos import own_ray_workers

        n = len(self.replicas.servers)
        while not self.stop.wait(self.period) and time.monotonic() < self.until:
            action = self.rng.choice(["kill_replica", "stop_replica", "kill_worker"])
            i = self.rng.randrange(n)
            if action == "kill_replica":
                self.replicas.kill(i)
                self.note("replica killed", f"kill -9 replica {i}")
                if self.stop.wait(self.period / 2):
                    self.replicas.restart(i)
                    break
                self.replicas.restart(i)
                self.note("replica restarted", f"replica {i} restarted")
            elif action == "stop_replica":
                self.replicas.pause(i)
                self.note("replica stopped", f"SIGSTOP replica {i} for {self.timeout_s + 1:.0f} s")
                self.stop.wait(self.timeout_s + 1)
                self.replicas.resume(i)
                self.note("replica resumed", f"SIGCONT replica {i}")
            else:
                workers = own_ray_workers()
                if workers:
                    victim = self.rng.choice(workers)
                    victim.kill()
                    self.note("worker killed", f"kill -9 stage worker pid {victim.pid}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=120)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--pool-size", type=int, default=2, help="stage actors")
    ap.add_argument("--chaos-seconds", type=float, default=120.0, help="chaos stops after this long (the bound)")
    ap.add_argument("--period", type=float, default=8.0, help="seconds between faults")
    ap.add_argument("--timeout-s", type=float, default=3.0, help="per request attempt")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import os

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from gmner_pipeline import runner
    from gmner_pipeline.shards import iter_committed_records
    from gmner_pipeline.summary import stage_totals
    from gmner_pipeline.testing.chaos import Replicas

    with tempfile.TemporaryDirectory(prefix="gmner-soak-") as tmp, Replicas(args.replicas) as replicas:
        work = Path(tmp)
        cfg = config(work, args.records, replicas.endpoints(max_concurrency=2), args.timeout_s, args.pool_size)
        print(f"# soak: {args.records} records, {args.replicas} llama.cpp replicas, {args.pool_size} stage actors, "
              f"a fault every {args.period:g} s for up to {args.chaos_seconds:g} s", flush=True)
        t0 = time.monotonic()
        chaos = Chaos(replicas, args.period, t0 + args.chaos_seconds, args.timeout_s, args.seed)
        chaos.start()
        try:
            result = runner.run(cfg)
        finally:
            chaos.stop.set()
            chaos.join(timeout=60)
        wall = time.monotonic() - t0
        records = list(iter_committed_records(result.plan.final_dir, columns=["id", "status", "error_kind"]))
        ids = Counter(r["id"] for r in records)
        llm = stage_totals(result.plan.final_dir)["llm"].get("teacher", {})
        sp = result.stages[ASK]
        print(f"run ok: {result.ok}; records {len(records)} (distinct {len(ids)}, duplicated "
              f"{sum(1 for v in ids.values() if v > 1)}, expected {args.records}); statuses "
              f"{dict(Counter(r['status'] for r in records))}")
        print(f"requests {llm.get('requests', 0)} ({llm.get('cache_hits', 0)} answered by the cache), retries {llm.get('retries', 0)}, failovers "
              f"{llm.get('failovers', 0)}, request errors {llm.get('errors', {})}; shards retried by the scheduler "
              f"{len(sp.retried)}; chaos: {dict(Counter(fault for _, fault, _ in chaos.log))}")
        print(f"wall {wall:.1f} s (chaos for {min(wall, args.chaos_seconds):.0f} s); {args.records / wall:.2f} records/s "
              f"end to end, {sp.records_per_s:.2f} records/s in the stage (requests are answered one at a time by "
              f"each llama.cpp replica)")


if __name__ == "__main__":
    main()
