"""What the ingest key knows of a source's files: per file its path relative to its folder and either its content hash
or its size and modification time.

Size and modification time alone miss an edit that keeps both (``cp -p``, ``rsync -t``, a restored backup), and a
stale key reuses stale outputs. So annotation files (small: Twitter-GMNER's 5.6k files are 5 MB) are hashed by
content; image folders (large) are only stat-ed unless the source asks for ``fingerprint: content``.

Hashing on every run would cost a full read of the annotations each time, so digests are memoised per file under a
stat signature that every content change alters: size, modification time, inode and *change time* (ctime cannot be
set back by ``touch``, ``cp -p`` or ``rsync -t``; writing the file or restoring its mtime both move it). A file
changed less than ``RACY_NS`` before it was hashed is not memoised (a second edit within the file system's timestamp
granularity could keep its signature), like git's racy-clean rule.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Iterator

from .atomic import write_bytes_atomic

log = logging.getLogger(__name__)

ANNOTATIONS, IMAGES = "annotations", "images"
MEMO_FILE = "source-digests.json"
RACY_NS = 2_000_000_000
_CHUNK = 1 << 20


def _walk(root: Path) -> Iterator[tuple[str, str, os.stat_result | None]]:
    """(relative path, path, stat or None when unreadable) for a file, or for every file under a folder, sorted."""
    if root.is_file():
        yield root.name, str(root), os.stat(root)
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            try:
                st: os.stat_result | None = os.stat(path)
            except OSError:  # a dangling link or unreadable file: that record's problem, not the whole run's
                st = None
            yield os.path.relpath(path, root), path, st


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class DigestMemo:
    """Content digests of files, valid while the file's stat signature is unchanged; kept in one JSON file."""

    def __init__(self, path: Path | None):
        self.path = path
        self.old: dict[str, list] = {}
        self.new: dict[str, list] = {}
        self.hashed = 0
        if path is not None and path.is_file():
            try:
                self.old = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                self.old = {}  # a damaged memo only costs a re-hash

    def digest(self, path: str, st: os.stat_result) -> str:
        signature = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        entry = self.old.get(path)
        if entry is not None and entry[:4] == signature:
            self.new[path] = entry
            return entry[4]
        digest = file_digest(path)
        self.hashed += 1
        if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) >= RACY_NS:
            self.new[path] = [*signature, digest]
        return digest

    def save(self) -> None:
        """Keep the digests of the files seen this time (so the memo never outgrows the source)."""
        if self.path is None or self.new == self.old:
            return
        try:
            write_bytes_atomic(self.path, json.dumps(self.new, separators=(",", ":")).encode())
        except OSError as exc:  # a read-only output folder: the run still works, it just re-hashes next time
            log.debug("could not save the source digest memo %s: %s", self.path, exc)


def fingerprint(roots: list[tuple[Path, str]], mode: str = "auto", memo_path: Path | None = None) -> str:
    """sha256 over every file under ``roots`` (``(path, ANNOTATIONS | IMAGES)``). ``mode``: ``auto`` (content for
    annotations, stat for images), ``content`` (content for all) or ``stat`` (size and mtime for all)."""
    h = hashlib.sha256(f"fingerprint:{mode}\n".encode())
    memo = DigestMemo(memo_path)
    for root, role in roots:
        by_content = mode == "content" or (mode == "auto" and role == ANNOTATIONS)
        if not root.exists():
            h.update(f"{role}|{root}|missing\n".encode())
            continue
        for rel, path, st in _walk(root):
            if st is None:
                state = "unreadable"
            elif by_content:
                try:
                    state = memo.digest(path, st)
                except OSError:
                    state = "unreadable"
            else:
                state = f"{st.st_size}|{st.st_mtime_ns}"
            h.update(f"{role}|{rel}|{state}\n".encode())
    memo.save()
    return h.hexdigest()[:16]
