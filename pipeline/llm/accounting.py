"""Token, latency, retry and cache accounting: per request (``LLMResult.usage()``), per record, per stage."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any, Iterable

from .request import LLMResult


class Accounting:
    """Running totals over many requests; thread-safe (the sync facade and async callers may share one)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = 0
        self.cache_hits = 0
        self.cache_misses = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.attempts = 0
        self.retries = 0
        self.failovers = 0
        self.latency_s = 0.0
        self.errors: Counter[str] = Counter()
        self.endpoints: Counter[str] = Counter()

    def add(self, result: LLMResult) -> None:
        with self._lock:
            self.requests += 1
            if result.cached:
                self.cache_hits += 1
            else:
                self.cache_misses += 1
            self.prompt_tokens += result.prompt_tokens
            self.completion_tokens += result.completion_tokens
            self.attempts += result.attempts
            self.retries += result.retries
            self.failovers += result.failovers
            self.latency_s += result.latency_s
            if result.error_kind:
                self.errors[result.error_kind] += 1
            if result.endpoint:
                self.endpoints[result.endpoint] += 1

    def snapshot(self) -> dict[str, Any]:
        """Totals as plain JSON (for a stage's stats file)."""
        with self._lock:
            return {
                "requests": self.requests, "cache_hits": self.cache_hits, "cache_misses": self.cache_misses,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "attempts": self.attempts, "retries": self.retries, "failovers": self.failovers,
                "latency_s": round(self.latency_s, 3),
                "errors": dict(self.errors), "by_endpoint": dict(self.endpoints),
            }


def lineage_usage(results: Iterable[LLMResult]) -> dict[str, Any]:
    """Sum the requests made for ONE record (what ``Stage.usage(record, results=...)`` records in its lineage: model_ids,
    prompt_tokens, completion_tokens, seconds)."""
    results = list(results)
    models = sorted({r.model for r in results if r.model})
    return {"model_ids": models,
            "prompt_tokens": sum(r.prompt_tokens for r in results),
            "completion_tokens": sum(r.completion_tokens for r in results),
            "seconds": round(sum(r.latency_s for r in results), 4)}
