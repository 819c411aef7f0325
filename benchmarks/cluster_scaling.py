"""Benchmark: how a stage scales with the number of Ray nodes, on a simulated cluster (ray.cluster_utils.Cluster:
several raylets on this machine, one CPU each), through the real runner.

    python benchmarks/cluster_scaling.py                          # both workloads on 1, 2 and 4 nodes
    python benchmarks/cluster_scaling.py --workload sleep --nodes 1 2 4 8 --records 1600
    python benchmarks/cluster_scaling.py --workload cpu --records 8000 --data /path/to/twitter-gmner-v2

Two workloads, because a simulated cluster shares one machine's cores:
  * ``sleep``: `passthrough` with ``sleep_per_record`` (work that waits, like an LLM stage waiting on a teacher). It
    shows the scheduler's scaling: what the runner gets out of N nodes when the nodes are not the limit.
  * ``cpu``: `template_cot` (pure Python, CPU-bound). It shows this machine's limit: on a 2-core machine N simulated
    nodes cannot beat 2 cores, whatever the runner does.
One actor per node (``pool_size`` = nodes, ``num_cpus: 1``), so each node holds one stage worker. Printed per run:
the stage's wall time (first shard submitted to last committed, actor start included) and records/s, the speed-up
over one node, and the parallelism achieved (the shards' own processing seconds, summed from their commit markers,
over the work window: N means N workers busy all the time). The work window runs from the first shard's start to
the last shard's commit (from the commit markers), so it leaves out actor start-up, which the stage time includes.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local test clusters (docs: environment.md)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from gmner_pipeline.config import RunConfig  # noqa: E402
from gmner_pipeline.runner import run, stage_totals  # noqa: E402
from gmner_pipeline.shards import read_markers  # noqa: E402

OBJECT_STORE = 100 * 1024 * 1024


def write_dataset(root: Path, n: int) -> Path:
    """n synthetic tweets in Twitter-GMNER layout (three entities each, a box on every third)."""
    (root / "txt").mkdir(parents=True, exist_ok=True)
    (root / "xml").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        lines += [f"IMGID:{100000 + i}", "RT\tO", "@user\tO", "Alice\tB-PER", "Smith\tI-PER", "visits\tO",
                  "Paris\tB-LOC", "with\tO", "Acme\tB-ORG", "Corp\tI-ORG", f"#{i}\tO", ""]
        if i % 3 == 0:
            (root / "xml" / f"{100000 + i}.xml").write_text(
                "<annotation><size><width>640</width><height>480</height><depth>3</depth></size>"
                "<object><name>Alice Smith</name><bndbox><xmin>10</xmin><ymin>5</ymin><xmax>300</xmax>"
                "<ymax>470</ymax></bndbox></object></annotation>")
    (root / "txt" / "train.txt").write_text("\n".join(lines) + "\n")
    return root


def workload_config(workload: str, nodes: int, data: Path, out: Path, records: int, shard_size: int,
                    sleep: float) -> RunConfig:
    stage = "passthrough" if workload == "sleep" else "template_cot"
    section: dict = {"resources": {"num_cpus": 1, "pool_size": nodes, "max_in_flight": 2}}
    if workload == "sleep":
        section["sleep_per_record"] = sleep
    return RunConfig.model_validate({
        "run": {"output_dir": str(out), "shard_size": shard_size, "progress": False},
        "source": {"kind": "twitter_gmner", "path": str(data), "limit": records},
        "pipeline": [stage],
        "stages": {stage: section},
    })


def measure(workload: str, nodes: int, data: Path, work: Path, args: argparse.Namespace) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    t0 = time.perf_counter()
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 1, "object_store_memory": OBJECT_STORE, "include_dashboard": False})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE)
    try:
        cluster.wait_for_nodes()
        startup = time.perf_counter() - t0
        out = work / f"{workload}-{nodes}"
        config = workload_config(workload, nodes, data, out, args.records, args.shard_size, args.sleep)
        config.run.ray_address = cluster.address
        result = run(config)
        if not result.ok:
            raise SystemExit(f"{workload} on {nodes} nodes failed: {result.stages}")
        (name, progress), = result.stages.items()
        wall = progress.finished - progress.started
        totals = stage_totals(result.plan.final_dir)
        markers = read_markers(result.plan.final_dir).values()
        # the work window: the first shard's start to the last shard's commit (actor start-up left out)
        window = max(m["finished_at"] for m in markers) - min(m["finished_at"] - m["seconds"] for m in markers)
        return {"workload": workload, "nodes": nodes, "records": progress.records_now, "wall_s": wall,
                "records_per_s": progress.records_now / wall, "window_s": window,
                "window_records_per_s": progress.records_now / window, "busy_s": totals["seconds"],
                "parallelism": totals["seconds"] / window, "cluster_start_s": startup,
                "nodes_used": len({m["node_id"] for m in markers})}
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=["sleep", "cpu", "both"], default="both")
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--records", type=int, default=None,
                        help="records per run (default: 800 for sleep, 6000 for cpu)")
    parser.add_argument("--shard-size", type=int, default=None, help="default: 10 for sleep, 100 for cpu")
    parser.add_argument("--sleep", type=float, default=0.05, help="seconds per record in the sleep workload")
    parser.add_argument("--data", type=Path, default=None, help="a Twitter-GMNER folder (default: synthetic tweets)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    print(f"machine: {os.cpu_count()} cores; python {sys.version.split()[0]}")

    rows = []
    workloads = ["sleep", "cpu"] if args.workload == "both" else [args.workload]
    with tempfile.TemporaryDirectory(prefix="gmner-scale-") as tmp:
        work = Path(tmp)
        for workload in workloads:
            wargs = argparse.Namespace(**vars(args))
            wargs.records = args.records or (800 if workload == "sleep" else 6000)
            wargs.shard_size = args.shard_size or (10 if workload == "sleep" else 100)
            data = args.data or write_dataset(work / f"data-{wargs.records}", wargs.records)
            for nodes in args.nodes:
                row = measure(workload, nodes, data, work, wargs)
                rows.append(row)
                print(f"  {workload:5s} {nodes} node(s): stage {row['wall_s']:6.2f} s ({row['records_per_s']:.1f} "
                      f"rec/s), work window {row['window_s']:.2f} s ({row['window_records_per_s']:.1f} rec/s), "
                      f"parallelism {row['parallelism']:.2f}, shards on {row['nodes_used']} node(s), "
                      f"cluster start {row['cluster_start_s']:.1f} s", flush=True)

    print("\nworkload  nodes  records  stage s  rec/s  speed-up | window s  rec/s  speed-up  parallelism")
    for row in rows:
        base = next(r for r in rows if r["workload"] == row["workload"] and r["nodes"] == min(args.nodes))
        print(f"{row['workload']:8s}  {row['nodes']:5d}  {row['records']:7d}  {row['wall_s']:7.2f}  "
              f"{row['records_per_s']:5.0f}  {row['records_per_s'] / base['records_per_s']:8.2f} | "
              f"{row['window_s']:8.2f}  {row['window_records_per_s']:5.0f}  "
              f"{row['window_records_per_s'] / base['window_records_per_s']:8.2f}  {row['parallelism']:11.2f}")


if __name__ == "__main__":
    main()
