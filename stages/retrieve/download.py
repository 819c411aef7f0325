"""A safe image downloader for URLs we did not choose (web search results, URL lists).

Each URL is fetched with: http(s) only; no loopback/private/link-local targets unless allowed (SSRF guard, checked on
every redirect hop); at most ``max_redirects`` redirects; connect/read timeouts plus a deadline for the whole body; a
size limit enforced on the Content-Length header and on the bytes actually read (after transfer decoding, so a gzip
bomb stops at the limit too); an image Content-Type; magic bytes of an accepted format; a pixel limit read from the
header before decoding; a full decode. Transient failures (connection errors, timeouts, 429, 5xx) are retried with
exponential backoff and jitter (tenacity); requests to one host are spaced by ``per_host_interval_s``. Accepted images
are stored content-addressed (``<store>/<sha[:2]>/<sha256>.<ext>``), so the same picture found under several URLs is
stored once.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import requests
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential, wait_random

from .config import DownloadConfig
from .images import ACCEPTED_CONTENT_TYPES, UnreadableImage, open_checked, sha256_hex, store_content_addressed

log = logging.getLogger(__name__)

DOWNLOAD_FAILED = "download_failed"
UNREADABLE_IMAGE = "unreadable_image"
_REDIRECTS = (301, 302, 303, 307, 308)


@dataclass(frozen=True)
class DownloadResult:
    url: str
    ok: bool
    path: str | None = None
    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    format: str | None = None
    reason: str | None = None  # download_failed | unreadable_image, when not ok
    message: str | None = None
    attempts: int = 1


class _Transient(Exception):
    """Worth another attempt (connection trouble, timeout, 429, 5xx)."""


class _Permanent(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class HostRateLimiter:
    """Spaces requests to the same host by at least ``interval`` seconds, across threads."""

    def __init__(self, interval: float):
        self.interval = interval
        self._next: dict[str, float] = {}
        self._lock = threading.Lock()

    def wait(self, host: str) -> None:
        if self.interval <= 0:
            return
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next.get(host, now))
            self._next[host] = slot + self.interval
        if slot > now:
            time.sleep(slot - now)


def check_url(url: str, allow_private: bool) -> str:
    """The URL's host, after checking the scheme and (unless allowed) that no address it resolves to is internal."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        raise _Permanent(DOWNLOAD_FAILED, f"refused scheme {parts.scheme or '(none)'!r}: only http/https")
    host = parts.hostname
    if not host:
        raise _Permanent(DOWNLOAD_FAILED, "URL has no host")
    if not allow_private:
        try:
            infos = socket.getaddrinfo(host, parts.port or (443 if parts.scheme == "https" else 80))
        except socket.gaierror as exc:
            raise _Transient(f"cannot resolve {host}: {exc}") from None
        for info in infos:
            addr = ipaddress.ip_address(info[4][0])
            if not addr.is_global:
                raise _Permanent(DOWNLOAD_FAILED, f"refused {host}: resolves to non-public address {addr} "
                                 "(download.allow_private_hosts=true allows it)")
    return host


class SafeDownloader:
    def __init__(self, cfg: DownloadConfig, store_dir: str | Path, session: requests.Session | None = None):
        self.cfg = cfg
        self.store_dir = Path(store_dir)
        self.session = session or requests.Session()
        self.session.headers.update({"User-Agent": cfg.user_agent, "Accept": "image/*"})
        self.limiter = HostRateLimiter(cfg.per_host_interval_s)
        self._pool = ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="img-download")

    def fetch_many(self, urls: list[str]) -> list[DownloadResult]:
        """Fetch in parallel; a URL listed twice is fetched once."""
        unique = list(dict.fromkeys(urls))
        results = dict(zip(unique, self._pool.map(self.fetch, unique), strict=True))
        return [results[url] for url in urls]

    def fetch(self, url: str) -> DownloadResult:
        attempts = 0

        def attempt() -> bytes:
            nonlocal attempts
            attempts += 1
            return self._get_once(url)

        try:
            data = Retrying(
                stop=stop_after_attempt(self.cfg.retries),
                wait=wait_exponential(multiplier=self.cfg.backoff_s, max=30) + wait_random(0, self.cfg.backoff_s),
                retry=retry_if_exception_type(_Transient),
                reraise=True,
            )(attempt)
            img, info = open_checked(data, self.cfg.max_pixels)
            img.close()
        except _Transient as exc:
            return self._fail(url, DOWNLOAD_FAILED, f"{exc} (after {attempts} attempts)", attempts)
        except _Permanent as exc:
            return self._fail(url, exc.reason, str(exc), attempts)
        except UnreadableImage as exc:
            return self._fail(url, UNREADABLE_IMAGE, str(exc), attempts)
        digest = sha256_hex(data)
        path = store_content_addressed(data, self.store_dir, info.extension, digest)
        return DownloadResult(url, True, str(path), digest, info.width, info.height, info.format, attempts=attempts)

    @staticmethod
    def _fail(url: str, reason: str, message: str, attempts: int) -> DownloadResult:
        log.info("download %s failed (%s): %s", url, reason, message)
        return DownloadResult(url, False, reason=reason, message=message, attempts=attempts)

    def _get_once(self, url: str) -> bytes:
        cfg = self.cfg
        current = url
        for _hop in range(cfg.max_redirects + 1):
            host = check_url(current, cfg.allow_private_hosts)
            self.limiter.wait(host)
            try:
                resp = self.session.get(current, stream=True, allow_redirects=False,
                                        timeout=(cfg.connect_timeout_s, cfg.read_timeout_s))
            except (requests.ConnectionError, requests.Timeout) as exc:
                raise _Transient(f"{type(exc).__name__}: {exc}") from None
            except requests.RequestException as exc:
                raise _Permanent(DOWNLOAD_FAILED, f"{type(exc).__name__}: {exc}") from None
            with resp:
                if resp.status_code in _REDIRECTS:
                    location = resp.headers.get("Location")
                    if not location:
                        raise _Permanent(DOWNLOAD_FAILED, f"HTTP {resp.status_code} without a Location header")
                    current = urljoin(current, location)
                    continue
                return self._read_body(resp)
        raise _Permanent(DOWNLOAD_FAILED, f"more than {cfg.max_redirects} redirects")

    def _read_body(self, resp: requests.Response) -> bytes:
        cfg = self.cfg
        status = resp.status_code
        if status == 429 or status >= 500:
            raise _Transient(f"HTTP {status}")
        if status != 200:
            raise _Permanent(DOWNLOAD_FAILED, f"HTTP {status}")
        ctype = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype not in ACCEPTED_CONTENT_TYPES:
            raise _Permanent(DOWNLOAD_FAILED, f"Content-Type {ctype or '(missing)'!r} is not an accepted image type")
        declared = resp.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > cfg.max_bytes:
            raise _Permanent(DOWNLOAD_FAILED, f"Content-Length {declared} exceeds max_bytes={cfg.max_bytes}")
        # A server can trickle bytes just fast enough to never trip the read timeout: a watchdog closes the
        # response when the whole-body deadline passes, which makes the blocked read return.
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            conn = getattr(resp.raw, "connection", None) or getattr(resp.raw, "_connection", None)
            sock = getattr(conn, "sock", None)
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # wakes a recv blocked in another thread; close() alone may not
                except OSError:
                    pass
            resp.close()

        watchdog = threading.Timer(cfg.total_timeout_s, expire)
        watchdog.daemon = True
        watchdog.start()
        chunks, size = [], 0
        try:
            for chunk in resp.iter_content(chunk_size=65536):
                size += len(chunk)
                if size > cfg.max_bytes:
                    raise _Permanent(DOWNLOAD_FAILED, f"body exceeds max_bytes={cfg.max_bytes}")
                chunks.append(chunk)
        except _Permanent:
            raise
        except Exception as exc:  # whatever a closed or broken connection raises mid-body
            if expired.is_set():
                raise _Permanent(DOWNLOAD_FAILED,
                                 f"body took longer than total_timeout_s={cfg.total_timeout_s}") from None
            if isinstance(exc, requests.exceptions.ContentDecodingError):
                raise _Permanent(DOWNLOAD_FAILED, f"bad content encoding: {exc}") from None
            raise _Transient(f"{type(exc).__name__} while reading: {exc}") from None
        finally:
            watchdog.cancel()
        if expired.is_set():
            raise _Permanent(DOWNLOAD_FAILED, f"body took longer than total_timeout_s={cfg.total_timeout_s}")
        return b"".join(chunks)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.session.close()
