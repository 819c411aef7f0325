"""Client for a JSON image-search HTTP API (the endpoint, parameters and response paths come from config)."""

from __future__ import annotations

import os
from typing import Any

import requests
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential, wait_random

from gmner_pipeline.stage import StageSetupError

from .config import WebSearchSource


class SearchError(RuntimeError):
    """The search API gave no usable answer for a query (the message says why)."""


class _Retryable(SearchError):
    pass


def is_transient(exc: SearchError) -> bool:
    """The search failed for a reason a later run may not meet (unreachable, 429, 5xx after the retries)."""
    return isinstance(exc, _Retryable)


def dig(value: Any, dotted: str) -> Any:
    """Follow ``a.b.0.c`` through dicts and lists; None when any step is missing."""
    for part in (p for p in dotted.split(".") if p):
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


def extract_urls(payload: Any, results_path: str, url_field: str, limit: int) -> list[str]:
    """The first ``limit`` distinct http(s) URLs found at ``results_path[*].url_field``."""
    results = dig(payload, results_path)
    if not isinstance(results, list):
        found = sorted(payload)[:10] if isinstance(payload, dict) else type(payload).__name__
        raise SearchError(f"response has no list at {results_path!r} (top level: {found}); "
                          "set stages.retrieve.source.results_path")
    urls: list[str] = []
    for result in results:
        url = dig(result, url_field)
        if isinstance(url, str) and url.lower().startswith(("http://", "https://")) and url not in urls:
            urls.append(url)
        if len(urls) >= limit:
            break
    return urls


def api_key(cfg: WebSearchSource) -> str | None:
    if not cfg.api_key_env:
        return None
    key = os.environ.get(cfg.api_key_env)
    if not key:
        raise StageSetupError(f"the image-search API key is missing: set the environment variable {cfg.api_key_env} "
                              "(or stages.retrieve.source.api_key_env: null for an endpoint without a key)")
    return key


class SearchClient:
    def __init__(self, cfg: WebSearchSource, session: requests.Session | None = None):
        self.cfg = cfg
        self.session = session or requests.Session()
        self.key = api_key(cfg)

    def _request_args(self, query: str, count: int) -> tuple[dict[str, str], dict[str, str]]:
        cfg = self.cfg
        params = dict(cfg.params)
        params[cfg.query_param] = query
        if cfg.count_param:
            params[cfg.count_param] = str(count)
        headers = {"Accept": "application/json"}
        if self.key is not None:
            if cfg.key_in == "header":
                headers[cfg.key_name] = f"{cfg.key_prefix}{self.key}"
            else:
                params[cfg.key_name] = self.key
        return params, headers

    def search(self, query: str, count: int) -> list[str]:
        params, headers = self._request_args(query, count)

        def once() -> Any:
            try:
                resp = self.session.get(self.cfg.endpoint, params=params, headers=headers,
                                        timeout=self.cfg.timeout_s)
            except (requests.ConnectionError, requests.Timeout) as exc:
                raise _Retryable(f"search endpoint unreachable: {type(exc).__name__}: {exc}") from None
            if resp.status_code == 429 or resp.status_code >= 500:
                raise _Retryable(f"search endpoint answered HTTP {resp.status_code}")
            if resp.status_code != 200:
                raise SearchError(f"search endpoint answered HTTP {resp.status_code}: {resp.text[:200]!r}")
            try:
                return resp.json()
            except ValueError:
                raise SearchError(f"search endpoint answered non-JSON: {resp.text[:200]!r}") from None

        backoff = self.cfg.backoff_s
        payload = Retrying(stop=stop_after_attempt(self.cfg.retries),
                           wait=wait_exponential(multiplier=backoff, max=30) + wait_random(0, backoff),
                           retry=retry_if_exception_type(_Retryable), reraise=True)(once)
        return extract_urls(payload, self.cfg.results_path, self.cfg.url_field, count)

    def close(self) -> None:
        self.session.close()
