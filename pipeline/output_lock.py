"""One writer per output folder: a second concurrent run would race on the same shards.

``with OutputLock(output_dir): ...`` takes an exclusive ``flock`` on ``<output_dir>/.lock`` (holding the pid, for the
message a second run gets). The OS drops the lock when the process dies, so a killed run never leaves a stale lock.

The same lock tells a stage worker whether its driver is still there (``driver_alive``): a worker checks it before it
commits a shard and between batches, so a worker whose driver was killed stops instead of writing on. (Workers only
test the lock, never hold it: a shared, non-blocking try that is released at once.) Only workers on the driver's host
test it: across hosts, file locks are only as good as the shared file system (an NFS mount with ``nolock`` keeps them
local), and there Ray itself ends the workers of a dead driver's job.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import IO

LOCK_FILE = ".lock"


class RunLockedError(RuntimeError):
    pass


class DriverGone(RuntimeError):
    """The run's driver no longer holds the output folder's lock: a worker must not commit anything more."""


def driver_alive(lock_file: str | Path) -> bool | None:
    """Whether some process holds ``lock_file`` exclusively (a run's driver): True, False, or None when the file
    system cannot tell (no flock support)."""
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
