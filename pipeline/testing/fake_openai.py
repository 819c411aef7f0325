"""An in-process fake OpenAI chat server with scripted faults, for unit tests of the client and of LLM stages.

It is deliberately dumb: it answers ``/v1/chat/completions`` with ``echo: <last user text>`` (n choices, logprobs when
asked) unless a fault is scheduled. A scripted model replaces the echo: ``reply(body)`` returns one text for every
choice (or None for the echo); ``reply_fn(body, choice_index)`` returns a choice's text, or ``(text, finish_reason)``
(e.g. a teacher that answers correctly in its own coordinate frame). Faults are taken in order from ``server.faults``
(one per request), or from a
``fault_fn(body, index)`` that returns one. Real-server behaviour is covered by the integration tests (vLLM, llama.cpp).

    with FakeOpenAI() as srv:
        srv.faults += [Fault.status(429, retry_after=0), Fault.status(500), Fault.truncated()]
        client = LLMClient(RoleConfig(endpoints=[srv.endpoint()]))
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from ..llm.config import EndpointConfig


@dataclass
class Fault:
    kind: str  # status | malformed | truncated | slow | drop | no_choices
    status: int = 500
    retry_after: float | None = None
    seconds: float = 0.0
    message: str = "fault injected by FakeOpenAI"

    @classmethod
    def status_code(cls, code: int, retry_after: float | None = None, message: str = "fault") -> "Fault":
        return cls("status", status=code, retry_after=retry_after, message=message)

    @classmethod
    def malformed(cls) -> "Fault":
        return cls("malformed")

    @classmethod
    def truncated(cls) -> "Fault":
        return cls("truncated")

    @classmethod
    def slow(cls, seconds: float) -> "Fault":
        """Answer normally, but only after ``seconds``."""
        return cls("slow", seconds=seconds)

    @classmethod
    def drop(cls) -> "Fault":
        """Close the connection without answering."""
        return cls("drop")

    @classmethod
    def no_choices(cls) -> "Fault":
        return cls("no_choices")


@dataclass
class Seen:
    body: dict[str, Any]
    headers: dict[str, str]
    at: float = field(default_factory=time.monotonic)


class FakeOpenAI:
    def __init__(self, model: str = "fake-model", *, honor_n: bool = True, delay_s: float = 0.0,
                 fault_fn: Callable[[dict[str, Any], int], Fault | None] | None = None,
                 completion_tokens: int = 3, reply: Callable[[dict[str, Any]], str | None] | None = None,
                 reply_fn: Callable[[dict[str, Any], int], str | tuple[str, str]] | None = None):
        self.model = model
        self.honor_n = honor_n
        self.delay_s = delay_s
        self.fault_fn = fault_fn
        self.completion_tokens = completion_tokens
        self.reply = reply
        self.reply_fn = reply_fn
        self.faults: list[Fault] = []
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self.dead = False
        self.port = 0
        self.in_flight = 0  # chat requests being answered now
        self.max_in_flight = 0  # the most at any moment (what a concurrency limit bounds)

    # --- lifecycle ---------------------------------------------------------------------------------------------------

    def start(self, port: int = 0) -> "FakeOpenAI":
        fake = self

        class Handler(_Handler):
            owner = fake

        ThreadingHTTPServer.request_queue_size = 128  # bursts of concurrent connects must not be reset
        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Die like a crashed replica: stop listening (new connections are refused) and cut open connections."""
        self.dead = True
        with self._lock:  # a test may stop a replica from a thread while its fixture stops it too
            server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        with self._lock:
            conns, self._connections = list(self._connections), set()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> "FakeOpenAI":
        return self.start() if self._server is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def endpoint(self, **kw: Any) -> EndpointConfig:
        return EndpointConfig(base_url=self.base_url, model=self.model, **kw)

    @property
    def calls(self) -> int:
        return len(self.seen)

    # --- behaviour ---------------------------------------------------------------------------------------------------

    def _next_fault(self, body: dict[str, Any]) -> Fault | None:
        with self._lock:
            index = len(self.seen) - 1
            if self.faults:
                return self.faults.pop(0)
        return self.fault_fn(body, index) if self.fault_fn else None

    def completion(self, body: dict[str, Any]) -> dict[str, Any]:
        messages = body.get("messages") or []
        last = messages[-1]["content"] if messages else ""
        if isinstance(last, list):
            last = " ".join(p.get("text", "") for p in last if p.get("type") == "text")
        n = int(body.get("n") or 1) if self.honor_n else 1
        seed = body.get("seed")
        choices = []
        scripted = self.reply(body) if self.reply else None
        for i in range(n):
            finish = "stop"
            if self.reply_fn is not None:
                reply = self.reply_fn(body, i)
                text, finish = (reply, "stop") if isinstance(reply, str) else reply
            elif scripted is not None:
                text = scripted
            else:
                text = f"echo: {last}" + (f" #{i}" if n > 1 else "") + (f" seed={seed}" if seed is not None else "")
            choice: dict[str, Any] = {"index": i, "finish_reason": finish,
                                      "message": {"role": "assistant", "content": text}}
            if body.get("logprobs"):
                k = int(body.get("top_logprobs") or 0)
                choice["logprobs"] = {"content": [
                    {"token": tok, "logprob": -0.5, "bytes": list(tok.encode()),
                     "top_logprobs": [{"token": tok, "logprob": -0.5, "bytes": list(tok.encode())}] * k}
                    for tok in text.split()[:4]]}
            choices.append(choice)
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
        return {"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()), "model": self.model,
                "choices": choices, "usage": {"prompt_tokens": prompt_tokens,
                                              "completion_tokens": self.completion_tokens * n,
                                              "total_tokens": prompt_tokens + self.completion_tokens * n}}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: FakeOpenAI

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        with self.owner._lock:
            self.owner._connections.add(self.connection)

    def finish(self) -> None:
        with self.owner._lock:
            self.owner._connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        if self.path.rstrip("/").endswith("/models"):
            self._send_json(200, {"object": "list", "data": [{"id": self.owner.model, "object": "model"}]})
        else:
            self._send_json(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            self._send_json(400, {"error": {"message": "request body is not JSON"}})
            return
        fake = self.owner
        if fake.dead:
            self._hang_up()
            return
        with fake._lock:
            fake.seen.append(Seen(body=body, headers=dict(self.headers)))
            fake.in_flight += 1
            fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
        try:
            self._answer(fake, body)
        finally:
            with fake._lock:
                fake.in_flight -= 1

    def _answer(self, fake: FakeOpenAI, body: dict[str, Any]) -> None:
        fault = fake._next_fault(body)
        if fake.delay_s:
            time.sleep(fake.delay_s)
        if fault is None or fault.kind == "slow":
            if fault is not None:
                time.sleep(fault.seconds)
            self._send_json(200, fake.completion(body))
        elif fault.kind == "status":
            headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
            self._send_json(fault.status, {"error": {"message": fault.message, "type": "fault", "code": fault.status}},
                            headers)
        elif fault.kind == "malformed":
            data = b'{"id": "x", "choices": [ {"message": '
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        elif fault.kind == "no_choices":
            self._send_json(200, {"id": "x", "object": "chat.completion", "model": fake.model, "choices": []})
        elif fault.kind == "truncated":
            data = json.dumps(fake.completion(body)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self._hang_up()
        elif fault.kind == "drop":
            self._hang_up()

    def _hang_up(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
