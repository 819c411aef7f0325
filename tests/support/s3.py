"""A local S3-compatible server for tests: moto's server mode (from the dev extra) in its own process, one bucket.

``with moto_bucket() as bucket:`` starts it on a free port, creates the bucket, and puts fake credentials into this
process's environment (restored afterwards), so subprocesses and their Ray workers inherit them the way cluster nodes
get theirs. ``bucket.url("out")`` is the location a run is pointed at: ``s3://<bucket>/out?endpoint_override=...``.
Use it from a module-scoped fixture: the server takes about half a second to start.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Iterator

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class Bucket:
    name: str
    port: int
    client: Any  # boto3's S3 client on the server, for checks that bypass the pipeline's own code
    log_path: str  # the server's log: one line per request (benchmarks/object_storage.py counts them)

    def url(self, prefix: str) -> str:
        return f"s3://{self.name}/{prefix}?endpoint_override=127.0.0.1:{self.port}&scheme=http&region=us-east-1"

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_bucket(name: str = "gmner-test") -> Iterator[Bucket]:
    import boto3

    port = _free_port()
    log = tempfile.NamedTemporaryFile(prefix=f"moto-{port}-", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    try:
        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1")
        deadline = time.time() + 60
        while True:
            try:
                client.create_bucket(Bucket=name)
                break
            except Exception:  # noqa: BLE001 - not listening yet
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"the moto S3 server did not start (see {log.name})") from None
                time.sleep(0.2)
        yield Bucket(name, port, client, log.name)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        os.unlink(log.name)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
