"""A real local HTTP server for the retrieve tests: good images, hostile responses, and a JSON image-search API."""

from __future__ import annotations

import gzip
import io
import json
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from PIL import Image

API_KEY = "test-key-123"


def png_bytes(size=(48, 32), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(size=(40, 40), color=(10, 120, 250)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (a decompression bomb as far as the header tells)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


class HostileServer:
    """Routes (all GET):
    /img/red.png, /img/blue.jpg, /img/red-copy.png (same bytes as red.png), /img/big.png (256x256, for pixel limits)
    /html (text/html), /fake.jpg (image/jpeg header, HTML body), /truncated.png, /bomb.png (huge header)
    /huge-declared (Content-Length over the limit), /huge-stream (no length, endless), /gzip-bomb (gzip encoding)
    /slow (drips bytes), /redirect/<n> (n hops then red.png), /to-file (redirect to file://)
    /flaky/<name> (503 twice per name, then red.png), /always-429, /missing (404)
    /search?q=...&count=N (JSON, needs 'Authorization: Bearer <API_KEY>'), /search-down (500)
    """

    def __init__(self) -> None:
        self.red, self.blue, self.big = png_bytes(), jpeg_bytes(), png_bytes((256, 256), (0, 200, 0))
        self.hits: dict[str, int] = {}
        self.search_results: dict[str, list[str]] = {}  # query substring -> paths
        self.default_results: list[str] = ["/img/red.png", "/img/blue.jpg"]
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def send(self, status, body=b"", ctype="image/png", headers=None):
                self.send_response(status)
                if ctype:
                    self.send_header("Content-Type", ctype)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                if "Content-Length" not in (headers or {}):
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if body:
                    self.wfile.write(body)

            def do_GET(self):  # noqa: N802
                url = urlsplit(self.path)
                path = url.path
                with server.lock:
                    server.hits[path] = server.hits.get(path, 0) + 1
                    hits = server.hits[path]
                base = f"http://{self.headers['Host']}"
                if path in ("/img/red.png", "/img/red-copy.png"):
                    return self.send(200, server.red)
                if path == "/img/blue.jpg":
                    return self.send(200, server.blue, "image/jpeg; charset=binary")
                if path == "/img/big.png":
                    return self.send(200, server.big)
                if path == "/html":
                    return self.send(200, b"<html>hi</html>", "text/html")
                if path == "/fake.jpg":
                    return self.send(200, b"<html>not an image</html>", "image/jpeg")
                if path == "/truncated.png":
                    return self.send(200, server.big[: len(server.big) // 2])
                if path == "/bomb.png":
                    return self.send(200, png_header_only(100_000, 100_000))
                if path == "/huge-declared":
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(10**9))
                    self.end_headers()
                    return
                if path == "/huge-stream":
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    try:
                        self.wfile.write(server.red[:16])
                        for _ in range(10_000):
                            self.wfile.write(b"\x00" * 65536)
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                    self.close_connection = True
                    return
                if path == "/gzip-bomb":
                    body = gzip.compress(server.red[:16] + b"\x00" * 5_000_000, compresslevel=9)
                    return self.send(200, body, headers={"Content-Encoding": "gzip", "Content-Length": str(len(body))})
                if path == "/slow":
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(server.red)))
                    self.end_headers()
                    try:
                        for byte in server.red:
                            self.wfile.write(bytes([byte]))
                            self.wfile.flush()
                            time.sleep(0.05)
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                    return
                if path.startswith("/redirect/"):
                    n = int(path.rsplit("/", 1)[1])
                    target = f"/redirect/{n - 1}" if n > 1 else "/img/red.png"
                    return self.send(302, b"", None, {"Location": target})
                if path == "/to-file":
                    return self.send(302, b"", None, {"Location": "file:///etc/passwd"})
                if path.startswith("/flaky/"):
                    if hits <= 2:
                        return self.send(503, b"busy", "text/plain")
                    return self.send(200, server.red)
                if path == "/always-429":
                    return self.send(429, b"slow down", "text/plain")
                if path == "/search":
                    if self.headers.get("Authorization") != f"Bearer {API_KEY}":
                        return self.send(401, b'{"error": "bad key"}', "application/json")
                    query = parse_qs(url.query).get("q", [""])[0]
                    count = int(parse_qs(url.query).get("count", ["5"])[0])
                    paths = next((v for k, v in server.search_results.items() if k in query), server.default_results)
                    body = {"results": [{"url": base + p, "title": p} for p in paths][:count] + [{"url": None}]}
                    return self.send(200, json.dumps(body).encode(), "application/json")
                if path == "/search-down":
                    return self.send(500, b"down", "text/plain")
                return self.send(404, b"not found", "text/plain")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "HostileServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
