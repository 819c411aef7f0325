"""One writer per output folder: a second concurrent run would race on the same shards.

``with OutputLock(output_dir): ...`` takes an exclusive ``flock`` on ``<output_dir>/.lock`` (holding the pid, for the
message a second run gets). The OS drops the lock when the process dies, so a killed run never leaves a stale lock.

On an object store (``s3://``, ``gs://``) there is no flock: ``OutputLock`` is then an ``ObjectLock``, the object
``<output>/.lock`` created only if absent (``storage.create_exclusive``: S3 ``If-None-Match: *``, GCS
``ifGenerationMatch=0``), holding the holder's host, pid and token, rewritten every ``ttl_s / 4`` seconds while the
run goes on (a heartbeat) and deleted at the end. A killed run cannot delete it: the next run takes it over once its
heartbeat has not changed for ``ttl_s`` (default 120 s, ``GMNER_LOCK_TTL_S``), so a rerun right after a kill waits
that long (no wait when the store's clock says the lock is long dead).

The same lock tells a stage worker whether its driver is still there (``driver_alive``): a worker checks it before it
commits a shard and between batches, so a worker whose driver was killed stops instead of writing on. (Workers only
test the lock, never hold it: a shared, non-blocking try that is released at once.) Only workers on the driver's host
test it: across hosts, file locks are only as good as the shared file system (an NFS mount with ``nolock`` keeps them
local), and there Ray itself ends the workers of a dead driver's job. Workers do not test a lock in a bucket either
(``driver_alive`` answers "cannot tell"): an object has no holder to ask, and its heartbeat goes stale only after
``ttl_s``, long after a killed driver's local workers are gone.
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

LOCK_FILE = ".lock"


class RunLockedError(RuntimeError):
    pass


class DriverGone(RuntimeError):
    """The run's driver no longer holds the output folder's lock: a worker must not commit anything more."""


def driver_alive(lock_file: str | Path) -> bool | None:
    """Whether some process holds ``lock_file`` exclusively (a run's driver): True, False, or None when the file
    system cannot tell (no flock support, or a lock object in a bucket)."""
    if is_remote(lock_file):
        return None
    try:
        fd = os.open(lock_file, os.O_RDONLY)
    except FileNotFoundError:
        return False
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def ensure_driver_alive(lock_file: str | Path | None) -> None:
    """Raise ``DriverGone`` when the run that started this worker is gone (no-op without a lock file)."""
    if lock_file and driver_alive(lock_file) is False:
        raise DriverGone(f"the run's driver no longer holds {lock_file}: it was killed; not committing")


class OutputLock:
    def __new__(cls, output_dir: "str | Path | ObjectPath", *args: Any, **kwargs: Any) -> Any:
        """A bucket URL gets an ``ObjectLock`` (see the module docstring); a local folder this flock."""
        if cls is OutputLock and is_remote(output_dir):
            return ObjectLock(location(output_dir))  # type: ignore[arg-type]
        return super().__new__(cls)

    def __init__(self, output_dir: str | Path, wait_s: float = 2.0):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_FILE
        self.wait_s = wait_s  # a worker of a killed run may be testing the lock for an instant
        self._fh: IO[str] | None = None

    def __enter__(self) -> "OutputLock":
        self.output_dir.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if driver_alive(self.path) is not True and time.monotonic() < deadline:
                    time.sleep(0.05)  # only shared holders (workers testing it), who let go at once
                    continue
                fh.seek(0)
                holder = fh.read().strip() or "unknown"
                fh.close()
                raise RunLockedError(f"another gmner-pipeline run (pid {holder}) is writing to {self.output_dir}; "
                                     "wait for it, or use another --set run.output_dir=...") from None
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
        self.path = output_dir / LOCK_FILE
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
