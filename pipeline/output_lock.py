"""One writer per output folder: a second concurrent run would race on the same shards.

``with OutputLock(output_dir): ...`` takes an exclusive ``flock`` on ``<output_dir>/.lock`` (holding the pid, for the
message a second run gets). The OS drops the lock when the process dies, so a killed run never leaves a stale lock.

On an object store (``s3://``, ``gs://``) there is no flock: ``OutputLock`` is then an ``ObjectLock``, the object
``<output>/.lock`` created only if absent (``storage.create_exclusive``: S3 ``If-None-Match: *``, GCS
``ifGenerationMatch=0``), holding the holder's host, pid and token, rewritten every ``ttl_s / 4`` seconds while the
run goes on (a heartbeat) and deleted at the end. A killed run cannot delete it: the next run takes it over once its
heartbeat has not changed for ``ttl_s`` (default 120 s, ``GMNER_LOCK_TTL_S``), so a rerun right after a kill waits
that long (no wait when the store's clock says the lock is long dead).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import IO, Any

from .storage import ObjectPath, age_s, create_exclusive, is_remote, location

log = logging.getLogger(__name__)

LOCK_TTL_S = 120.0


class RunLockedError(RuntimeError):
    pass


class OutputLock:
    def __new__(cls, output_dir: "str | Path | ObjectPath", *args: Any, **kwargs: Any) -> Any:
        if cls is OutputLock and is_remote(output_dir):
            return ObjectLock(location(output_dir))  # type: ignore[arg-type]
        return super().__new__(cls)

    def __init__(self, output_dir: str | Path):
        self.output_dir = Path(output_dir)
        self._fh: IO[str] | None = None

    def __enter__(self) -> "OutputLock":
        self.output_dir.mkdir(parents=True, exist_ok=True)
        fh = open(self.output_dir / ".lock", "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise RunLockedError(f"another gmner-pipeline run (pid {holder}) is writing to {self.output_dir}; wait "
                                 "for it, or use another --set run.output_dir=...") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._fh = fh
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


class ObjectLock:
    """The output lock on an object store (see the module docstring)."""

    def __init__(self, output_dir: ObjectPath, ttl_s: float | None = None, wait_s: float | None = None):
        self.output_dir = output_dir
        self.path = output_dir / ".lock"
        self.ttl_s = ttl_s if ttl_s is not None else float(os.environ.get("GMNER_LOCK_TTL_S") or LOCK_TTL_S)
        self.wait_s = self.ttl_s + 10 if wait_s is None else wait_s  # a killed run's lock goes stale within ttl_s
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                           "heartbeat": time.time()}).encode()

    def _holder(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def __enter__(self) -> "ObjectLock":
        deadline = time.monotonic() + self.wait_s
        seen: tuple[Any, float] | None = None  # the holder's last heartbeat, and when this run first saw it
        while not create_exclusive(self.path, self._body()):
            holder = self._holder()
            now = time.monotonic()
            if seen is None or seen[0] != holder.get("heartbeat"):
                seen = (holder.get("heartbeat"), now)
            # stale: no new heartbeat for ttl_s by this machine's clock, or an object far older than that by the
            # store's (so a long-dead lock needs no wait; the margin absorbs clock skew)
            unchanged_s = now - seen[1]
            age = age_s(self.path)
            if unchanged_s > self.ttl_s or (age is not None and age > 2 * self.ttl_s + 60):
                log.warning("taking over the lock of %s: its holder (%s, pid %s) stopped renewing it",
                            self.output_dir, holder.get("host"), holder.get("pid"))
                self.path.unlink(missing_ok=True)  # two takers: create_exclusive lets only one of them through
                seen = None
                continue
            if now > deadline:
                raise RunLockedError(
                    f"another gmner-pipeline run ({holder.get('host')}, pid {holder.get('pid')}) is writing to "
                    f"{self.output_dir}; wait for it, or use another --set run.output_dir=... (a killed run's lock "
                    f"is taken over once it has not been renewed for {self.ttl_s:.0f} s)")
            time.sleep(min(2.0, max(0.2, self.ttl_s / 10)))
        self._beat = threading.Thread(target=self._heartbeat, name="output-lock-heartbeat", daemon=True)
        self._beat.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            if self._holder().get("token") not in (self.token, None):
                log.error("the lock of %s was taken over by another run (this run stalled for more than %.0f s); "
                          "stop one of them", self.output_dir, self.ttl_s)
                return
            try:
                self.path.write_bytes(self._body())
            except OSError as exc:
                log.warning("could not renew the lock of %s: %s", self.output_dir, exc)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=10)
        if self._holder().get("token") == self.token:
            self.path.unlink(missing_ok=True)
