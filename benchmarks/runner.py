"""The runner's overhead, in one run: the runner vs Ray Data vs the stage in one process, on the same stage and the
same ingest shards; then the default run's wall time and Ray start-up/shutdown's share of it.

* ``runner``: ``runner.execute`` (the actor pool, commit markers, exactly-once) on the ingest shards.
* ``raydata``: ``ray.data.read_parquet -> map_batches(stage) -> write_parquet`` with the same pool size and CPUs per
  actor, on the same Ray instance (started once, so neither pays Ray's start-up).
* ``inprocess``: read, stage, write and commit each shard in this process: the floor. Timed step by step, so the
  output says where a shard's time goes.

Modes alternate in every round (the order rotates), and per-round ratios are reported with their median and spread.
The runner's time is also split into what its actors spent on shards (from the commit markers) and the rest (actor
start, dispatch, closing the pool).

    python benchmarks/runner.py                                   # template_cot on 7k records, 3 rounds (~3 min)
    python benchmarks/runner.py --records 70000 --shard-size 2000 --rounds 3
    python benchmarks/runner.py --stage passthrough --skip-startup
    python benchmarks/runner.py --startup-rounds 5 --skip-modes   # only the default run's start-up figures

Start-up: ``--startup-rounds`` fresh ``gmner-pipeline run synthesize --set pipeline=[template_cot]`` (the bundled
sample without its LLM stages) in subprocesses, each timed from process start to exit, with ``ray.init`` / ``ray.shutdown`` timed inside and
the peak memory of the whole process tree (the driver and every Ray process) sampled beside it. ``--startup-set``
passes settings to those runs: ``--startup-set run.ray_dashboard=true`` starts Ray's full set of processes, for the
comparison with the default (only what a run needs). Run this script with another checkout's interpreter to measure
that checkout (the child runs import ``gmner_pipeline`` from the interpreter's environment).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import DEFAULT_DATA, source_of_size


# --- the three modes -------------------------------------------------------------------------------------------------

class StageBatches:
    """Ray Data's map_batches callable: the stage over a pyarrow batch, in the stage's own batch size."""

    def __init__(self, stage_name: str, config: dict[str, Any]):
        from gmner_pipeline.stage import StageContext
        from gmner_pipeline.stages import load_stage
        from gmner_pipeline.worker import start_stage

        cls = load_stage(stage_name)
        cfg = cls.Config.model_validate(config)
        self.batch_size = cfg.batch_size
        self.stage = start_stage(cls, cfg, StageContext(run_id="raydata"))

    def __call__(self, batch):
        from gmner_pipeline.schema import records_to_table, table_to_records
        from gmner_pipeline.worker import run_batch

        records = table_to_records(batch)
        out = []
        for start in range(0, len(records), self.batch_size):
            out.extend(run_batch(self.stage, records[start:start + self.batch_size]))
        return records_to_table(out)


def run_inprocess(plan, stage_plan, num_shards: int) -> dict[str, float]:
    from gmner_pipeline.shards import commit_shard, read_records, shard_path, write_records
    from gmner_pipeline.stage import StageContext, check_contract
    from gmner_pipeline.worker import run_batch, shard_stats, start_stage, stop_stage

    out = stage_plan.dir
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0, c0 = time.perf_counter(), time.process_time()
    stage = start_stage(stage_plan.cls, stage_plan.config, StageContext(run_id="inprocess", stage_key=stage_plan.key))
    steps = {"setup": time.perf_counter() - t0, "read": 0.0, "stage": 0.0, "write": 0.0, "commit": 0.0}
    bs = stage_plan.config.batch_size
    records_total = 0
    for i in range(num_shards):
        t = time.perf_counter()
        records = read_records(shard_path(plan.ingest.dir, i))
        steps["read"] += time.perf_counter() - t
        t = time.perf_counter()
        result = []
        for start in range(0, len(records), bs):
            result.extend(run_batch(stage, records[start:start + bs]))
        check_contract(records, result, stage_plan.name)
        steps["stage"] += time.perf_counter() - t
        t = time.perf_counter()
        write_records(shard_path(out, i), result)
        steps["write"] += time.perf_counter() - t
        t = time.perf_counter()
        commit_shard(out, i, shard_stats(result, stage_plan.name))
        steps["commit"] += time.perf_counter() - t
        records_total += len(records)
    stop_stage(stage)
    return {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0, "records": records_total, **steps}


def run_runner(plan, cfg, num_shards: int) -> dict[str, float]:
    from gmner_pipeline import runner
    from gmner_pipeline.shards import read_markers

    stage_plan = plan.stages[0]
    shutil.rmtree(stage_plan.dir, ignore_errors=True)
    t0_wall = time.time()
    t0 = time.perf_counter()
    contexts = runner.stage_contexts(plan, cfg, "bench", None)
    with runner.Backend(cfg, plan, contexts) as backend:
        progress = runner.execute(plan, cfg, num_shards, backend)
    wall = time.perf_counter() - t0
    t_end = time.time()
    markers = list(read_markers(stage_plan.dir).values())
    assert len(markers) == num_shards and not progress[stage_plan.name].failed
    starts = [m["finished_at"] - m["seconds"] for m in markers]
    in_actor = sum(m["seconds"] for m in markers)
    return {"wall": wall, "records": sum(m["records_in"] for m in markers), "in_actor": in_actor,
            "to_first_shard": min(starts) - t0_wall, "after_last_shard": t_end - max(m["finished_at"] for m in markers)}


def run_raydata(ray, plan, stage_plan, out: Path) -> dict[str, float]:
    from gmner_pipeline.shards import SHARD_GLOB

    shutil.rmtree(out, ignore_errors=True)
    res = stage_plan.config.resources
    files = sorted(str(p) for p in plan.ingest.dir.glob(SHARD_GLOB))
    t0 = time.perf_counter()
    (ray.data.read_parquet(files)
     .map_batches(StageBatches, fn_constructor_args=(stage_plan.name, stage_plan.config.model_dump(mode="json")),
                  batch_size=None, batch_format="pyarrow", num_cpus=res.num_cpus,
                  compute=ray.data.ActorPoolStrategy(size=res.pool_size))
     .write_parquet(str(out)))
    wall = time.perf_counter() - t0
    import pyarrow.parquet as pq

    rows = sum(pq.read_metadata(p).num_rows for p in out.glob("*.parquet"))
    return {"wall": wall, "records": rows}


def compare_modes(args) -> None:
    import ray

    from gmner_pipeline.config import load_config
    from gmner_pipeline.ingest_step import run_ingest
    from gmner_pipeline.plan import plan_run

    work = Path(tempfile.mkdtemp(prefix="gmner-runner-bench-"))
    try:
        src, what = source_of_size(work / "src", args.records, args.data)
        cfg = load_config(None, [
            f"run.output_dir={work / 'out'}", f"run.shard_size={args.shard_size}", "run.progress=false",
            "source.kind=twitter_gmner", f"source.path={src}", f"pipeline=[{args.stage}]",
            f"stages.{args.stage}.resources.pool_size={args.pool_size}",
            f"stages.{args.stage}.resources.num_cpus={args.actor_cpus}"])
        plan = plan_run(cfg)
        ingest = run_ingest(plan.ingest, cfg.source, work / "out" / "cache", "bench")
        n_shards = ingest["num_shards"]
        print(f"# {what}: {ingest['records_in']} records in {n_shards} shards of {args.shard_size}; stage "
              f"{args.stage}; pool_size {args.pool_size} x {args.actor_cpus} CPU per actor; Ray with "
              f"{args.cpus} CPUs; {args.rounds} rounds", flush=True)
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR",
                 object_store_memory=512 * 2**20)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        modes = ["runner", "raydata", "inprocess"]
        results: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
        for r in range(args.rounds):
            order = modes[r % 3:] + modes[:r % 3]
            for mode in order:
                if mode == "runner":
                    res = run_runner(plan, cfg, n_shards)
                elif mode == "raydata":
                    res = run_raydata(ray, plan, plan.stages[0], work / "raydata-out")
                else:
                    res = run_inprocess(plan, plan.stages[0], n_shards)
                assert res["records"] == ingest["records_in"], (mode, res)
                results[mode].append(res)
                print(f"round {r} {mode:<9} {res['wall']:7.2f} s  {res['records'] / res['wall']:8.0f} rec/s",
                      flush=True)
        ray.shutdown()
        report_modes(results, ingest["records_in"])
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _spread(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}"
    return f"{statistics.median(values):.2f} (min {min(values):.2f}, max {max(values):.2f})"


def report_modes(results: dict[str, list[dict[str, float]]], records: int) -> None:
    rate = {m: [records / x["wall"] for x in rs] for m, rs in results.items()}
    print("\nrecords/s, median (min, max) over rounds:")
    for mode, values in rate.items():
        print(f"  {mode:<9} {_spread(values)}")
    runner_vs = {other: [a / b for a, b in zip(rate["runner"], rate[other])] for other in ("raydata", "inprocess")}
    print(f"RATIO runner / Ray Data: {_spread(runner_vs['raydata'])}   (target >= 1)")
    print(f"RATIO runner / in-process: {_spread(runner_vs['inprocess'])}   (target >= 0.9 once shards are large)")
    rr = results["runner"]
    ip = results["inprocess"]
    med = lambda key, rs: statistics.median(x[key] for x in rs)  # noqa: E731
    print("\nwhere the runner's time goes (medians, s): "
          f"wall {med('wall', rr):.2f} = to the first shard (actor start, setup, dispatch) "
          f"{med('to_first_shard', rr):.2f} + shards in the actor(s) {med('in_actor', rr):.2f} (summed over actors) "
          f"+ after the last shard (closing the pool) {med('after_last_shard', rr):.2f} + the rest")
    print("where a shard's time goes in one process (medians, s): " + ", ".join(
        f"{k} {med(k, ip):.2f}" for k in ("setup", "read", "stage", "write", "commit")) +
        f"; wall {med('wall', ip):.2f}, CPU {med('cpu', ip):.2f}")


# --- the default run's start-up --------------------------------------------------------------------------------------

RAY_PARTS = ("ray_import", "ray_init", "ray_shutdown")


def child_default_run(out: str, sets: list[str]) -> None:
    """In a fresh process: the README's first command, with Ray's import, start and stop timed."""
    import psutil

    t_proc = psutil.Process().create_time()
    t_main = time.time()
    timings: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*a, **kw):
            t = time.time()
            try:
                return fn(*a, **kw)
            finally:
                timings[name] = timings.get(name, 0.0) + time.time() - t
        return wrapper

    from gmner_pipeline import ray_executor
    from gmner_pipeline.cli import app

    t_imported = time.time()
    plain_session = ray_executor.ray_session

    @contextlib.contextmanager
    def timed_session(config):  # the runner imports and starts Ray only when some shard needs work
        t = time.time()
        import ray

        timings["ray_import"] = time.time() - t
        ray.init = timed("ray_init", ray.init)
        ray.shutdown = timed("ray_shutdown", ray.shutdown)
        with plain_session(config) as session:
            yield session

    ray_executor.ray_session = timed_session
    try:
        extra = [arg for item in sets for arg in ("--set", item)]
        app(["run", "synthesize", "--output", out, "--set", "run.progress=false", *extra], standalone_mode=False)
    finally:
        t_end = time.time()
        latest = json.loads((Path(out) / "latest.json").read_text()) if (Path(out) / "latest.json").is_file() else {}
        print("CHILD " + json.dumps({"python_start": t_main - t_proc, "imports": t_imported - t_main,
                                     "command": t_end - t_imported, "ingest": latest.get("ingest", {}).get("seconds"),
                                     "t_end": t_end, **timings}), flush=True)


def startup(args) -> None:
    from common import TreeSampler

    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": "local"}
    rows = []
    # Start-up cost is measured on the sample through template CoT (no LLM): the default run's whole graph spends
    # minutes in the embedded model, which would bury the seconds of Ray and Python start-up this measures.
    sets = ["pipeline=[template_cot]", *(args.startup_set or [])]
    print(f"\n# the sample through template CoT (`gmner-pipeline run synthesize --set pipeline=[template_cot]`, "
          f"fresh output folder), then a rerun; "
          f"{args.startup_rounds} rounds; settings {sets or 'default'}; gmner_pipeline from {sys.executable}",
          flush=True)
    for r in range(args.startup_rounds):
        with tempfile.TemporaryDirectory(prefix="gmner-startup-") as tmp:
            for kind in ("first", "rerun"):
                t0 = time.time()
                child_argv = [sys.executable, __file__, "--child-default-run", str(Path(tmp) / "out")]
                child_argv += [arg for item in sets for arg in ("--startup-set", item)]
                proc = subprocess.Popen(child_argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, cwd=tmp)
                with TreeSampler(proc.pid, interval_s=0.1) as sampler:
                    stdout, stderr = proc.communicate()
                wall = time.time() - t0
                line = next((ln for ln in stdout.splitlines() if ln.startswith("CHILD ")), None)
                if proc.returncode != 0 or line is None:
                    raise SystemExit(f"default run failed: {stderr[-2000:]}")
                child = json.loads(line[len("CHILD "):])
                child.update(kind=kind, wall=wall, exit=t0 + wall - child["t_end"],  # interpreter teardown
                             tree_mib=sampler.total_peak / 2**20, processes=len(sampler.peaks))
                rows.append(child)
                ray_s = sum(child.get(k, 0.0) for k in RAY_PARTS)
                ingest = f"{child['ingest'] or 0:.2f}" if kind == "first" else "reused"
                print(f"round {r} {kind:<5} wall {wall:5.2f} s: python start {child['python_start']:.2f}, imports "
                      f"{child['imports']:.2f}, command {child['command']:.2f} (import ray "
                      f"{child.get('ray_import', 0):.2f}, ray.init {child.get('ray_init', 0):.2f}, ray.shutdown "
                      f"{child.get('ray_shutdown', 0):.2f}, ingest {ingest}), exit {child['exit']:.2f}; Ray's share "
                      f"{ray_s / wall:.0%}; peak memory of the process tree {child['tree_mib']:.0f} MiB over "
                      f"{child['processes']} processes", flush=True)
    for kind in ("first", "rerun"):
        rs = [x for x in rows if x["kind"] == kind]
        share = [sum(x.get(k, 0.0) for k in RAY_PARTS) / x["wall"] for x in rs]
        parts = "; ".join(f"{k} {_spread([x.get(k, 0.0) for x in rs])} s" for k in RAY_PARTS)
        print(f"{kind}: wall {_spread([x['wall'] for x in rs])} s; {parts}; Ray's share (import + init + shutdown) "
              f"{statistics.median(share):.0%}; peak memory {_spread([x['tree_mib'] for x in rs])} MiB over "
              f"{statistics.median([x['processes'] for x in rs]):.0f} processes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", default="template_cot")
    ap.add_argument("--records", type=int, default=7000)
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--pool-size", type=int, default=1)
    ap.add_argument("--actor-cpus", type=float, default=1.0, help="CPUs per actor, the same in the runner and Ray Data")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the Ray instance")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--startup-rounds", type=int, default=3)
    ap.add_argument("--skip-startup", action="store_true")
    ap.add_argument("--skip-modes", action="store_true")
    ap.add_argument("--startup-set", action="append", help="a --set for the start-up runs (repeatable)")
    ap.add_argument("--child-default-run", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_default_run:
        child_default_run(args.child_default_run, args.startup_set or [])
        return
    if not args.skip_modes:
        compare_modes(args)
    if not args.skip_startup:
        startup(args)


if __name__ == "__main__":
    main()
