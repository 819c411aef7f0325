"""Hashes: of JSON payloads (stage keys, config hashes) and of files and folders (model identities for lineage,
stage keys and the LLM cache)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

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


def dir_sha256(path: str | os.PathLike[str]) -> str:
    """Full hex sha256 of a folder's files (relative names and contents, in sorted order): the identity of a saved
    model or adapter folder (a PEFT adapter's config + weights), independent of where the folder lies."""
    root = Path(path)
    if root.is_file():
        return file_sha256(root)
    h = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(file.relative_to(root).as_posix().encode() + b"\0")
        h.update(file_sha256(file).encode())
    return h.hexdigest()


def stable_hash(payload: Any, length: int = 16) -> str:
    """sha256 of a JSON-serialisable payload, canonicalised (sorted keys), first ``length`` hex digits."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]
