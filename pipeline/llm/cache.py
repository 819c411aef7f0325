"""Persistent request cache: an answered request is never sent again (reruns, resumes after a crash).

The key is a sha256 over everything that determines the answer (``request_key``). Two backends, one interface:

* ``SqliteCache``: one sqlite file in WAL mode; many processes on ONE machine read and write it concurrently (readers
  never block, writers wait on ``busy_timeout``). The local default.
* ``FileCache``: one JSON file per answer under ``<path>/<k[:2]>/<k>.json``, written to a temporary name and renamed
  into place (atomic on POSIX and NFS), so concurrent writers of the same key cannot leave a torn file. Use it on
  shared storage for a cluster: sqlite's locking is not safe on network file systems. In a bucket (``s3://``,
  ``gs://``: ``storage.py``) each answer is one object PUT, atomic as well.

Only successful answers are stored; errors are retried by the next run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from ..atomic import atomic_open
from ..storage import ObjectPath, location
from .config import CacheConfig

log = logging.getLogger(__name__)

KEY_VERSION = 1  # bump when the meaning of a cached value changes


def _strip_images(value: Any) -> Any:
    """Messages with every data URL replaced by the sha256 of its payload (equal images, equal key; small to hash)."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if k == "url" and isinstance(v, str) and v.startswith("data:"):
                out[k] = "sha256:" + hashlib.sha256(v.encode()).hexdigest()
            else:
                out[k] = _strip_images(v)
        return out
    if isinstance(value, list):
        return [_strip_images(v) for v in value]
    return value


def request_key(model_identity: str, messages: list[dict[str, Any]], params: dict[str, Any]) -> str:
    """sha256 over model identity (id@revision), messages (images by content hash) and every sampling parameter
    (temperature, top_p, top_k, max_tokens, stop, seed, n, logprobs, response_format, extra body)."""
    payload = {"v": KEY_VERSION, "model": model_identity, "messages": _strip_images(messages),
               "params": {k: v for k, v in params.items() if v is not None}}
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class RequestCache(Protocol):
    def get(self, key: str) -> dict[str, Any] | None: ...
    def put(self, key: str, value: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class SqliteCache:
    """sqlite in WAL mode; one connection per process and thread (connections are not shared across forks)."""

    def __init__(self, path: str | Path, busy_timeout_s: float = 60.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._busy_ms = int(busy_timeout_s * 1000)
        self._local = threading.local()
        conn = self._conn()
        conn.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, value TEXT NOT NULL, "
                     "created REAL NOT NULL)")

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "pid", None) != os.getpid():
            conn = sqlite3.connect(self.path, timeout=self._busy_ms / 1000, isolation_level=None,
                                   check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout={self._busy_ms}")
            self._ensure_wal(conn)
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def _ensure_wal(self, conn: sqlite3.Connection) -> None:
        """WAL is a property of the file, set once. Switching to it ignores the busy timeout when several processes
        open a new cache at the same moment ("database is locked"), so retry until the busy timeout is spent."""
        deadline = time.monotonic() + self._busy_ms / 1000
        while True:
            try:
                if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def get(self, key: str) -> dict[str, Any] | None:
        row = self._conn().execute("SELECT value FROM answers WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        self._conn().execute("INSERT OR REPLACE INTO answers (key, value, created) VALUES (?, ?, ?)",
                             (key, json.dumps(value, ensure_ascii=False), time.time()))

    def __len__(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


class FileCache:
    """Content-addressed JSON files with atomic rename (or objects in a bucket); safe on shared storage."""

    def __init__(self, path: "str | Path | ObjectPath"):
        self.path = location(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def _file(self, key: str) -> Path:
        return self.path / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._file(key).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            log.warning("llm cache: unreadable entry %s ignored (it will be re-requested)", key)
            return None

    def put(self, key: str, value: dict[str, Any]) -> None:
        with atomic_open(self._file(key), "w", encoding="utf-8") as fh:
            json.dump(value, fh, ensure_ascii=False)

    def __len__(self) -> int:
        return sum(1 for _ in self.path.glob("*/*.json"))

    def close(self) -> None:
        pass


def open_cache(config: CacheConfig) -> RequestCache | None:
    if not config.enabled:
        return None
    path = config.resolved_path()
    return SqliteCache(path) if config.backend == "sqlite" else FileCache(path)
