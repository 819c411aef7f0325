"""Atomic file writes: write a temporary file beside the target, then rename it into place.

Readers never see a half-written file, a crash leaves at most a temporary file behind, and two processes writing the
same target just replace each other's complete copy. Temporary names contain ``.tmp-`` (``TMP_MARK``) and end in
``.tmp``, so folder scans can skip them and ``shards.remove_stale_temporaries`` can clean them up.

On an object store (``s3://``, ``gs://``: ``storage.py``) the bytes are buffered and PUT once when the block succeeds:
an object PUT is atomic already, and there is no rename to make it so.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

from .storage import REMOTE_SCHEMES, ObjectPath, location

TMP_MARK = ".tmp-"


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb", *, durable: bool = False,
                encoding: str | None = None) -> Iterator[IO]:
    """``with atomic_open(p) as fh: fh.write(...)``: ``p`` appears, whole, only when the block succeeds.
    ``durable`` fsyncs before the rename (commit markers and shards: they must survive a machine crash)."""
    if isinstance(path, str) and path.startswith(REMOTE_SCHEMES) or isinstance(path, ObjectPath):
        with _buffered_put(path, mode, encoding) as fh:
            yield fh
        return
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


@contextlib.contextmanager
def _buffered_put(path: "str | ObjectPath", mode: str, encoding: str | None) -> Iterator[IO]:
    buffer: IO = io.BytesIO() if "b" in mode else io.StringIO()
    yield buffer
    data = buffer.getvalue()
    location(path).write_bytes(data if isinstance(data, bytes) else data.encode(encoding or "utf-8"))


def write_bytes_atomic(path: str | Path, data: bytes, *, durable: bool = False) -> None:
    with atomic_open(path, "wb", durable=durable) as fh:
        fh.write(data)
