"""Memory from 1k to 100k records: peak RSS of every process of a run (the driver, Ray's own processes, the stage
actors) and the stage's records/s, for the template_cot and passthrough stages.

Each (size, stage) is one fresh ``gmner-pipeline run`` in a subprocess on Twitter-GMNER v2 train replicated to the
size (new ids; see common.py), with the default settings (shard_size 256, one actor). Memory is flat when the peaks
stay the same as the record count grows: the driver moves file names, never records, and an actor holds one shard.

    python benchmarks/memory.py                                  # 1k and 10k records (about 2 minutes here)
    python benchmarks/memory.py --sizes 1000,10000,100000        # the full sweep (about 10 minutes here)
    python benchmarks/memory.py --data /path/to/twitter-gmner-v2 --stages template_cot
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from common import DEFAULT_DATA, TreeSampler, mib, source_of_size

OURS = ("driver", "actor:ShardActor")  # every other process of the tree is Ray's own


def one_run(work: Path, source: Path, stage: str, shard_size: int) -> dict:
    out = work / f"out-{stage}"
    config = {"run": {"output_dir": str(out), "shard_size": shard_size, "progress": False},
              "source": {"kind": "twitter_gmner", "path": str(source)}, "pipeline": [stage]}
    path = work / f"{stage}.yaml"
    path.write_text(yaml.safe_dump(config))
    # RAY_ADDRESS=local: a run of its own even when `ray start` ran on this machine
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": "local"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "gmner_pipeline.cli", "run", "--config", str(path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with TreeSampler(proc.pid) as sampler:
        _, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}): {err[-2000:]}")
    latest = json.loads((out / "latest.json").read_text())
    return {"wall_s": wall, "records_per_s": latest["stages"][stage]["records_per_s"],
            "ingest_s": latest["ingest"]["seconds"], "kinds": sampler.by_kind(), "total_peak": sampler.total_peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,10000", help="record counts, comma-separated")
    ap.add_argument("--stages", default="passthrough,template_cot")
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Twitter-GMNER v2 folder (else synthetic)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    stages = args.stages.split(",")

    rows = []
    with tempfile.TemporaryDirectory(prefix="gmner-mem-") as tmp:
        for n in sizes:
            src, what = source_of_size(Path(tmp) / f"src-{n}", n, args.data)
            print(f"# {what}", flush=True)
            for stage in stages:
                work = Path(tmp) / f"run-{n}"
                work.mkdir(exist_ok=True)
                r = one_run(work, src, stage, args.shard_size)
                kinds = r["kinds"]
                actor = kinds.get("actor:ShardActor", (0, 0))
                ray_own = sum(peak for kind, (_, peak) in kinds.items() if kind not in OURS)
                row = {"records": n, "stage": stage, **{k: r[k] for k in ("wall_s", "records_per_s", "ingest_s")},
                       "driver_mib": kinds.get("driver", (0, 0))[1] / 2**20, "actor_mib": actor[1] / 2**20,
                       "actors": actor[0], "gcs_mib": kinds.get("gcs_server", (0, 0))[1] / 2**20,
                       "raylet_mib": kinds.get("raylet", (0, 0))[1] / 2**20, "ray_own_mib": ray_own / 2**20,
                       "total_peak_mib": r["total_peak"] / 2**20,
                       "per_kind": {k: {"processes": c, "peak_mib": round(p / 2**20, 1)} for k, (c, p) in kinds.items()}}
                rows.append(row)
                print(f"{n:>7} {stage:<13} wall {r['wall_s']:6.1f} s  ingest {r['ingest_s']:5.1f} s  "
                      f"{r['records_per_s']:8.0f} rec/s  peak RSS MiB: driver {mib(kinds.get('driver', (0, 0))[1])}"
                      f"  actor {mib(actor[1])}  gcs {mib(kinds.get('gcs_server', (0, 0))[1])}  raylet "
                      f"{mib(kinds.get('raylet', (0, 0))[1])}  Ray's own (sum of peaks) {ray_own / 2**20:.0f}  "
                      f"whole tree {r['total_peak'] / 2**20:.0f}", flush=True)
    print("\nper process kind (processes, peak MiB), last run:")
    for kind, v in sorted(rows[-1]["per_kind"].items(), key=lambda kv: -kv[1]["peak_mib"]):
        print(f"  {kind:<28} {v['processes']:>3}  {v['peak_mib']:.0f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
