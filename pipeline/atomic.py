"""Atomic file writes: write a temporary file beside the target, then rename it into place.

Readers never see a half-written file, a crash leaves at most a temporary file behind, and two processes writing the
same target just replace each other's complete copy. Temporary names contain ``.tmp-`` (``TMP_MARK``) and end in
``.tmp``, so folder scans can skip them and ``shards.remove_stale_temporaries`` can clean them up.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

TMP_MARK = ".tmp-"


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb", *, durable: bool = False,
                encoding: str | None = None) -> Iterator[IO]:
    """``with atomic_open(p) as fh: fh.write(...)``: ``p`` appears, whole, only when the block succeeds.
    ``durable`` fsyncs before the rename (commit markers and shards: they must survive a machine crash)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}{TMP_MARK}", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, encoding=encoding) as fh:
            yield fh
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are meant to be readable like any other file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes, *, durable: bool = False) -> None:
    with atomic_open(path, "wb", durable=durable) as fh:
        fh.write(data)
