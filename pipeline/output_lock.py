"""One writer per output folder: a second concurrent run would race on the same shards.

``with OutputLock(output_dir): ...`` takes an exclusive ``flock`` on ``<output_dir>/.lock`` (holding the pid, for the
message a second run gets). The OS drops the lock when the process dies, so a killed run never leaves a stale lock.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO


class RunLockedError(RuntimeError):
    pass


class OutputLock:
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
