"""What a stage sends (``LLMRequest``) and what it gets back (``LLMResult``): plain data, no I/O."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# error kinds a stage can count (LLMResult.error_kind)
BAD_REQUEST = "bad_request"        # 400/404/422...: the request itself is wrong (e.g. context too long); not retried
EXHAUSTED = "retries_exhausted"   # 429/5xx/timeouts/connection errors until the retry budget ran out
MALFORMED = "malformed_response"  # the server kept answering with something that is not a chat completion
AUTH = "auth"                     # 401/403: the key is missing or wrong
INTERNAL = "internal"             # a bug on our side; the message says what
# Kinds a rerun can cure without changing the request: the servers were down, overloaded or answering garbage, or the
# key was wrong (fix it and rerun). A stage records them with ``mark_error(..., transient=result.transient)``.
TRANSIENT_KINDS = frozenset({EXHAUSTED, MALFORMED, AUTH})


@dataclass
class LLMRequest:
    """One chat request. Fields left ``None`` take the role's sampling defaults."""

    messages: list[dict[str, Any]]
    n: int | None = None
    seed: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    stop: list[str] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    extra_body: dict[str, Any] | None = None
    tag: str | None = field(default=None, compare=False)  # the caller's label (e.g. record id), for logs only


@dataclass
class Choice:
    text: str
    finish_reason: str | None = None
    logprobs: list[dict[str, Any]] | None = None  # OpenAI shape: [{"token", "logprob", "top_logprobs": [...]}]


@dataclass
class LLMResult:
    """The answer to one ``LLMRequest``, or why there is none. Never raises into the stage."""

    choices: list[Choice] = field(default_factory=list)
    model: str = ""                 # the model identity (id@revision) the answer came from
    endpoint: str | None = None     # base_url that answered (None for cache hits)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0          # wall time of this call, retries and backoff included
    attempts: int = 0               # HTTP requests sent (0 for a cache hit)
    failovers: int = 0              # tries sent to another endpoint than the try before (a replica failed)
    cached: bool = False
    cache_key: str = ""
    error: str | None = None
    error_kind: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def transient(self) -> bool:
        """The request failed for a reason outside it (see ``TRANSIENT_KINDS``): a rerun should try it again."""
        return self.error is not None and self.error_kind in TRANSIENT_KINDS

    @property
    def text(self) -> str:
        """The first choice's text ('' when there is none)."""
        return self.choices[0].text if self.choices else ""

    @property
    def texts(self) -> list[str]:
        return [c.text for c in self.choices]

    @property
    def retries(self) -> int:
        return max(0, self.attempts - 1)

    def usage(self) -> dict[str, Any]:
        """Per-request accounting, small enough for a record's lineage."""
        return {"model": self.model, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "latency_s": round(self.latency_s, 4),
                "retries": self.retries, "cached": self.cached, "error_kind": self.error_kind}

    def to_cache(self) -> dict[str, Any]:
        return {"choices": [asdict(c) for c in self.choices], "model": self.model,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}

    @classmethod
    def from_cache(cls, data: dict[str, Any], key: str) -> "LLMResult":
        return cls(choices=[Choice(**c) for c in data["choices"]], model=data.get("model", ""),
                   prompt_tokens=data.get("prompt_tokens", 0), completion_tokens=data.get("completion_tokens", 0),
                   cached=True, cache_key=key)
