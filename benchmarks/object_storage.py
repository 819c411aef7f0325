"""Benchmark: what a run costs on object storage, against a local S3 server (moto's server mode, tests/support/s3.py),
next to the same run on local disk. The bundled sample through `template_cot` (ingest + one stage), first run and a
rerun that finds everything committed, through the CLI.

    python benchmarks/object_storage.py                     # shard_size 1 (10 shards) and 3 (4 shards)
    python benchmarks/object_storage.py --shard-sizes 1 2 5

Printed per run: wall time on disk and in the bucket, and the bucket's requests by method (GET includes LIST),
in total and per shard (ingest and stage shards together). moto answers from memory on this machine, so the wall
times say nothing about a real store's latency; the request counts are what carries over (a real store bills and
throttles per request).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from support.s3 import moto_bucket  # noqa: E402

CLI = str(Path(sys.executable).parent / "gmner-pipeline")
REQUEST = re.compile(r'"(?:\x1b\[[0-9;]*m)*(GET|PUT|HEAD|DELETE|POST) ')  # some lines are coloured (ANSI codes)


def run(config: Path) -> float:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    done = subprocess.run([CLI, "run", "synthesize", "--config", str(config)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return time.perf_counter() - t0


def requests(log_path: str, start: int) -> tuple[Counter, int]:
    lines = Path(log_path).read_text(errors="replace").splitlines()
    return Counter(m.group(1) for line in lines[start:] if (m := REQUEST.search(line))), len(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shard-sizes", type=int, nargs="+", default=[1, 3])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, moto_bucket("bench") as bucket:
        for size in args.shard_sizes:
            shards = -(-10 // size)  # the sample has 10 records
            for label in ("first run", "rerun"):
                row = {}
                for where in ("disk", "bucket"):
                    out = str(Path(tmp) / f"out-{size}") if where == "disk" else bucket.url(f"out-{size}")
                    config = Path(tmp) / f"{where}-{size}.yaml"
                    config.write_text(yaml.safe_dump({
                        "run": {"output_dir": out, "shard_size": size, "progress": False},
                        "source": {"kind": "sample"}, "pipeline": ["template_cot"]}))
                    start = requests(bucket.log_path, 0)[1]
                    row[where] = run(config)
                    if where == "bucket":
                        counts, _ = requests(bucket.log_path, start)
                total = sum(counts.values())
                by_method = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
                print(f"shard_size {size} ({shards} shards x 2 folders), {label}: disk {row['disk']:.1f} s, bucket "
                      f"{row['bucket']:.1f} s; bucket requests {total} ({by_method}), {total / (2 * shards):.1f} "
                      "per shard")


if __name__ == "__main__":
    main()
