"""Content hashes of model files: identities for lineage, stage keys and the LLM cache."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_MEMO: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Full hex sha256 of a file, memoised per process by (path, size, mtime): weight files are large and are
    identified again by every stage instance that loads them."""
    stat = os.stat(path)
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _MEMO:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
        _MEMO[key] = h.hexdigest()
    return _MEMO[key]
