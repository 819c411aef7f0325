"""One client for every OpenAI-compatible server (vLLM, llama.cpp, OpenAI): replicas, failover, retries, cache.

* **Spreading.** Each request goes to the healthy endpoint with the fewest requests in flight per unit of weight;
  each endpoint admits at most ``max_concurrency`` requests at once.
* **Failover.** An endpoint that fails ``circuit.failure_threshold`` times in a row leaves the rotation for a cooldown
  (doubling while it keeps failing); after it, one probe request decides whether it comes back. A retry prefers
  another endpoint than the one that just failed. So one dead replica costs a few retries, never the job.
* **Replicas that move.** A role with a ``directory`` (managed replicas, ``replicas.py``) looks its endpoints' current
  URLs up when one is out of rotation and due for a probe (at most once a second): a replica restarted on another
  node or port takes its old one's place, back in rotation.
* **Retries** (tenacity): exponential backoff with jitter, at least the server's ``Retry-After``, on 429, 408, 5xx,
  timeouts, connection errors and unreadable bodies only. Any other 4xx (a 400 for a too-long context) comes back
  at once as an ``LLMResult`` with ``error_kind="bad_request"``: a stage records it on the record and goes on.
* **Cache**: answered requests are looked up before anything is sent (see cache.py).
* **n > 1**: the server's ``n`` where it honours it, else n requests with seeds ``seed, seed+1, ...``.

Use the async API (``acomplete``, ``acomplete_many``) from one event loop (a stage's ``aprocess``), or the sync
facade (``complete``, ``complete_many``) from plain code such as a stage's ``process``: it runs the requests
concurrently on the client's event loop thread (the worker's, for a client from ``Stage.llm``). API keys are read from
the environment when a client is built and are never logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from typing import Any, Iterable

import httpx2
import openai
import pydantic
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, stop_after_delay

from . import request as kinds
from .accounting import Accounting
from .cache import RequestCache, open_cache, request_key
from .config import CircuitConfig, EndpointConfig, LLMConfig, RoleConfig
from .identity import role_identity
from .loop import LoopThread
from .request import Choice, LLMRequest, LLMResult

log = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 409, 425, 429})  # plus every 5xx
LOOKUP_INTERVAL_S = 1.0  # at most one replica-directory lookup per client per interval


class MalformedResponse(Exception):
    """The server answered 2xx with something that is not a chat completion."""


class NoEndpoint(Exception):
    """The role has no endpoints configured."""


class EndpointsDown(Exception):
    """Every endpoint of the role is out of rotation and none comes back within the request's time budget."""


def is_retryable(exc: BaseException) -> bool:
    """Transient failures only: 429/408 (and 409/425), 5xx, timeouts, connection errors, unreadable bodies."""
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in RETRYABLE_STATUS or exc.status_code >= 500
    return isinstance(exc, (openai.APIConnectionError, MalformedResponse, openai.APIResponseValidationError,
                            json.JSONDecodeError, pydantic.ValidationError, httpx2.TransportError))


def _is_throttle(exc: BaseException) -> bool:
    """429: the server is alive but busy. It is retried with backoff, but does not count against the endpoint."""
    return isinstance(exc, openai.APIStatusError) and exc.status_code == 429


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, openai.APIStatusError):
        if exc.status_code in (401, 403):
            return kinds.AUTH
        if not is_retryable(exc):
            return kinds.BAD_REQUEST
        return kinds.EXHAUSTED
    if isinstance(exc, (MalformedResponse, json.JSONDecodeError, openai.APIResponseValidationError,
                        pydantic.ValidationError)):
        return kinds.MALFORMED
    if is_retryable(exc) or isinstance(exc, EndpointsDown):
        return kinds.EXHAUSTED
    return kinds.INTERNAL


def _describe(exc: BaseException) -> str:
    """A one-line message for the record: status and the server's own message, never request headers."""
    if isinstance(exc, openai.APIStatusError):
        body = exc.body if isinstance(exc.body, (str, dict)) else None
        detail = body.get("message") if isinstance(body, dict) else body
        return f"HTTP {exc.status_code}: {str(detail or exc.message)[:500]}"
    return f"{type(exc).__name__}: {str(exc)[:500]}"


def _retry_after_s(exc: BaseException | None) -> float:
    if isinstance(exc, openai.APIStatusError):
        value = exc.response.headers.get("retry-after")
        try:
            return max(0.0, float(value)) if value is not None else 0.0
        except ValueError:
            return 0.0
    return 0.0


class Endpoint:
    """One server of a role, with its concurrency limit and circuit-breaker state (used from one event loop)."""

    def __init__(self, config: EndpointConfig, circuit: CircuitConfig, timeout: httpx2.Timeout,
                 slots: asyncio.Semaphore | None = None):
        self.config = config
        self.circuit = circuit
        self._timeout = timeout
        self._api_key = config.api_key()  # read now: a missing variable fails the client, not the 10,000th request
        self._client: openai.AsyncOpenAI | None = None
        self._sem: asyncio.Semaphore | None = slots  # shared with other roles' clients of the same server
        self.in_flight = 0
        self.failures = 0          # consecutive
        self.open_until = 0.0      # monotonic time until which the endpoint is out of rotation
        self.cooldown = circuit.cooldown_s
        self.probing = False
        self.last_error = ""

    def __repr__(self) -> str:  # never the key
        return f"Endpoint({self.config.base_url}, model={self.config.model})"

    @property
    def client(self) -> openai.AsyncOpenAI:
        if self._client is None:
            self._client = openai.AsyncOpenAI(base_url=self.config.base_url, api_key=self._api_key,
                                              max_retries=0, timeout=self._timeout)
        return self._client

    @property
    def slots(self) -> asyncio.Semaphore:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.config.max_concurrency)
        return self._sem

    def tripped(self) -> bool:
        return self.failures >= self.circuit.failure_threshold

    def usable(self, now: float) -> bool:
        """In rotation, or cooled down and nobody is probing it yet."""
        if not self.tripped():
            return True
        return now >= self.open_until and not self.probing

    def load(self) -> float:
        return (self.in_flight + 1) / self.config.weight

    def claim(self) -> bool:
        """Called when a request is routed here; True when that request is the half-open probe."""
        if self.tripped():
            self.probing = True
            return True
        return False

    def succeeded(self) -> None:
        if self.tripped():
            log.warning("llm endpoint %s is back in rotation", self.config.base_url)
        self.failures = 0
        self.cooldown = self.circuit.cooldown_s
        self.probing = False

    def failed(self, now: float, why: str, probe: bool) -> None:
        self.last_error = why
        if probe:  # the probe failed: out again, for longer
            self.probing = False
            self.cooldown = min(self.cooldown * 2, self.circuit.max_cooldown_s)
            self.open_until = now + self.cooldown
            log.info("llm endpoint %s still failing (%s); next probe in %.1f s", self.config.base_url, why,
                        self.cooldown)
            return
        if self.tripped():
            return  # requests sent before it tripped: already out, they do not extend the cooldown
        self.failures += 1
        if self.tripped():
            self.open_until = now + self.cooldown
            log.warning("llm endpoint %s out of rotation for %.1f s after %d failures in a row (last: %s)",
                        self.config.base_url, self.cooldown, self.failures, why)

    def retarget(self, base_url: str) -> None:
        """The replica behind this endpoint moved (restarted elsewhere): send to ``base_url`` from now on, back in
        rotation. Requests still in flight to the old address finish or fail on their own client."""
        log.warning("llm endpoint %s moved to %s", self.config.base_url, base_url)
        self.config = self.config.model_copy(update={"base_url": base_url})
        self._client = None  # the old one is left to the garbage collector: closing it would cut its requests
        self.failures = 0
        self.cooldown = self.circuit.cooldown_s
        self.open_until = 0.0
        self.probing = False

    def released(self) -> None:
        """A probe that ended neither in success nor in a server fault (cancelled, our bug) frees the probe slot."""
        self.probing = False

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


class _Tries:
    """What one logical request's tries have in common: how many were sent, where the last one went, and how often a
    try went to another endpoint than the one before it (a failover)."""

    __slots__ = ("count", "last", "failovers")

    def __init__(self) -> None:
        self.count = 0
        self.last: Endpoint | None = None
        self.failovers = 0


class LLMClient:
    """The client for ONE role. A stage gets it from ``self.llm.client(role)`` (``context.LLMContext``: the worker's
    loop, per-server limits shared across roles); elsewhere ``LLMClient.from_config(llm_config, role)`` after the
    endpoints were resolved (``services.llm_services``).

    ``loop``: run the sync facade on this (shared) loop instead of a private one. ``shared_slots``: per base URL, the
    semaphore that bounds requests in flight to that server, shared with other clients in this process."""

    def __init__(self, role: RoleConfig, *, role_name: str = "default", cache: RequestCache | None = None,
                 accounting: Accounting | None = None, loop: LoopThread | None = None,
                 shared_slots: dict[str, asyncio.Semaphore] | None = None):
        if not role.endpoints:
            raise NoEndpoint(f"LLM role {role_name!r} has no endpoints: configure llm.roles.{role_name}.endpoints, or "
                             f"run inside gmner_pipeline.llm.services.llm_services() which starts the embedded server")
        self.role = role
        self.role_name = role_name
        self.identity = role_identity(role)  # the one identity: cache key, lineage, stage key
        self.cache = cache
        self.accounting = accounting or Accounting()
        timeout = httpx2.Timeout(role.timeout_s, connect=role.connect_timeout_s)
        self.endpoints = [
            Endpoint(e, role.circuit, timeout,
                     None if shared_slots is None else shared_slots.setdefault(
                         e.base_url, asyncio.Semaphore(e.max_concurrency)))
            for e in role.endpoints]
        self._server_n: bool | None = None if role.n_mode == "auto" else role.n_mode == "server"
        self._loop: LoopThread | None = loop
        self._own_loop = loop is None
        self._rng = random.Random()
        self._next_lookup = 0.0  # monotonic time of the next allowed directory lookup

    @classmethod
    def from_config(cls, llm_config: LLMConfig | dict[str, Any], role: str, *,
                    accounting: Accounting | None = None) -> "LLMClient":
        config = LLMConfig.coerce(llm_config)
        return cls(config.role(role), role_name=role, cache=open_cache(config.cache), accounting=accounting)

    # --- public API ---------------------------------------------------------------------------------------------

    async def acomplete(self, req: LLMRequest) -> LLMResult:
        t0 = time.perf_counter()
        params = self._params(req)
        key = request_key(self.identity, req.messages, params)
        hit = self._cache_get(key) if self.cache is not None else None
        if hit is not None:
            result = LLMResult.from_cache(hit, key)
        else:
            result = await self._answer(req, params, key)
            if result.ok and self.cache is not None:
                self._cache_put(key, result)
        result.latency_s = time.perf_counter() - t0
        self.accounting.add(result)
        return result

    async def acomplete_many(self, requests: Iterable[LLMRequest]) -> list[LLMResult]:
        """All requests concurrently (bounded by the endpoints' ``max_concurrency``), results in input order."""
        return list(await asyncio.gather(*(self.acomplete(r) for r in requests)))

    def complete_many(self, requests: Iterable[LLMRequest]) -> list[LLMResult]:
        """Sync facade for plain code (a stage's ``process``): runs the batch concurrently, blocks until done."""
        return self._sync().run(self.acomplete_many(list(requests)))

    def complete(self, req: LLMRequest) -> LLMResult:
        return self._sync().run(self.acomplete(req))

    def stats(self) -> dict[str, Any]:
        return {"role": self.role_name, "model": self.identity, **self.accounting.snapshot()}

    async def aclose(self) -> None:
        for ep in self.endpoints:
            await ep.aclose()

    def close(self) -> None:
        if self._loop is not None:
            self._loop.run(self.aclose())
            if self._own_loop:
                self._loop.stop()
            self._loop = None
        if self.cache is not None:
            self.cache.close()

    def __enter__(self) -> "LLMClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals ----------------------------------------------------------------------------------------------

    def _cache_get(self, key: str) -> dict[str, Any] | None:
        """A broken cache (disk full, locked past its timeout, bad entry) costs a re-request, never the record."""
        try:
            return self.cache.get(key)  # type: ignore[union-attr]
        except Exception as exc:  # noqa: BLE001
            log.warning("llm cache lookup failed (%s); asking the server", exc)
            return None

    def _cache_put(self, key: str, result: LLMResult) -> None:
        try:
            self.cache.put(key, result.to_cache())  # type: ignore[union-attr]
        except Exception as exc:  # noqa: BLE001
            log.warning("llm cache write failed (%s); the answer is returned but not cached", exc)

    def _sync(self) -> LoopThread:
        if self._loop is None:
            self._loop = LoopThread()
            self._own_loop = True
        return self._loop

    def _params(self, req: LLMRequest) -> dict[str, Any]:
        """The effective sampling parameters (request overrides role defaults): what is sent and what is keyed."""
        s = self.role.sampling

        def pick(value: Any, default: Any) -> Any:
            return default if value is None else value

        params: dict[str, Any] = {
            "n": pick(req.n, s.n), "seed": pick(req.seed, s.seed), "temperature": pick(req.temperature, s.temperature),
            "top_p": pick(req.top_p, s.top_p), "max_tokens": pick(req.max_tokens, s.max_tokens),
            "stop": pick(req.stop, s.stop), "logprobs": req.logprobs, "top_logprobs": req.top_logprobs,
            "response_format": req.response_format,
        }
        extra = dict(req.extra_body or {})
        top_k = pick(req.top_k, s.top_k)
        if top_k is not None:
            extra.setdefault("top_k", top_k)
        params["extra_body"] = extra or None
        return params

    async def _answer(self, req: LLMRequest, params: dict[str, Any], key: str) -> LLMResult:
        n = params["n"]
        base_seed = params["seed"] if params["seed"] is not None else int(key[:8], 16)
        if n == 1:
            return await self._call(req, params, key)
        if self._server_n is not False:
            first = await self._call(req, {**params, "seed": base_seed}, key)
            if not first.ok or len(first.choices) >= n:
                if first.ok:
                    self._server_n = True
                return first
            if self._server_n is None:
                log.info("llm role %s: the server returned %d of n=%d choices; using seeded requests for n",
                         self.role_name, len(first.choices), n)
            self._server_n = False
            parts, seeds = [first], range(base_seed + len(first.choices), base_seed + n)
        else:
            parts, seeds = [], range(base_seed, base_seed + n)
        parts += await asyncio.gather(*(self._call(req, {**params, "n": 1, "seed": s}, key) for s in seeds))
        return _merge(parts, n, key)

    async def _call(self, req: LLMRequest, params: dict[str, Any], key: str) -> LLMResult:
        """One chat completion with retries and failover; never raises.

        The first try runs outside tenacity: building a retry controller costs more CPU than everything else the
        client adds to a request, and most requests never need one."""
        retry = self.role.retry
        t0 = time.monotonic()
        deadline = t0 + retry.max_total_s
        tries = _Tries()
        try:
            try:
                result = await self._try(tries, req, params, deadline)
            except Exception as exc:
                if not is_retryable(exc) or retry.max_attempts == 1:
                    raise
                await asyncio.sleep(min(self._backoff(1, exc), max(0.0, deadline - time.monotonic())))

                def wait(state: RetryCallState) -> float:
                    return self._backoff(state.attempt_number + 1, state.outcome.exception() if state.outcome else None)

                async for attempt in AsyncRetrying(
                    stop=stop_after_attempt(retry.max_attempts - 1)
                    | stop_after_delay(max(0.0, deadline - time.monotonic())),
                    wait=wait, retry=retry_if_exception(is_retryable), reraise=True,
                ):
                    with attempt:
                        result = await self._try(tries, req, params, deadline)
            result.attempts, result.cache_key, result.failovers = tries.count, key, tries.failovers
            return result
        except Exception as exc:  # noqa: BLE001 - every failure becomes a result on the record
            if not isinstance(exc, (openai.OpenAIError, MalformedResponse, EndpointsDown)) and not is_retryable(exc):
                log.exception("llm role %s: unexpected error", self.role_name)
            return LLMResult(model=self.identity, endpoint=tries.last.config.base_url if tries.last else None,
                             attempts=tries.count, cache_key=key, error=_describe(exc), error_kind=_error_kind(exc),
                             failovers=tries.failovers)

    async def _try(self, tries: "_Tries", req: LLMRequest, params: dict[str, Any], deadline: float) -> LLMResult:
        endpoint, probe = await self._pick(avoid=tries.last, deadline=deadline)
        if tries.last is not None and endpoint is not tries.last:
            tries.failovers += 1
        tries.last = endpoint
        tries.count += 1
        return await self._send(endpoint, probe, req, params)

    def _backoff(self, failures: int, exc: BaseException | None) -> float:
        """Wait before the next try after ``failures`` failed ones: exponential, capped, jittered, >= Retry-After."""
        retry = self.role.retry
        wait = min(retry.initial_backoff_s * (2 ** (failures - 1)), retry.max_backoff_s)
        wait += self._rng.uniform(0, retry.jitter_s)
        if retry.honor_retry_after:
            wait = max(wait, min(_retry_after_s(exc), retry.max_backoff_s))
        return wait

    async def _pick(self, avoid: Endpoint | None, deadline: float) -> tuple[Endpoint, bool]:
        """The least-loaded usable endpoint, preferring one other than ``avoid``, and whether the request is a probe.
        When every endpoint is out of rotation, waits for the next probe slot until ``deadline``."""
        while True:
            now = time.monotonic()
            if self.role.directory is not None and now >= self._next_lookup and \
                    any(e.tripped() and now >= e.open_until for e in self.endpoints):
                await self._relocate(now)
            usable = [e for e in self.endpoints if e.usable(now)]
            if len(usable) > 1 and avoid in usable:
                usable.remove(avoid)
            if usable:
                best = min(e.load() for e in usable)
                chosen = self._rng.choice([e for e in usable if e.load() == best])
                return chosen, chosen.claim()
            waits = [e.open_until - now for e in self.endpoints if e.open_until > now and not e.probing]
            pause = max(0.01, min(waits)) if waits else 0.05  # else: a probe is in flight, its outcome decides
            if now + pause > deadline:
                last = "; ".join(f"{e.config.base_url}: {e.last_error}" for e in self.endpoints)
                raise EndpointsDown(f"all {len(self.endpoints)} endpoint(s) of role {self.role_name!r} are out of "
                                    f"rotation ({last})")
            await asyncio.sleep(pause)

    async def _relocate(self, now: float) -> None:
        """Ask the role's directory where its replicas are now; move endpoints whose replica has a new URL."""
        from .directory import read_directory

        self._next_lookup = now + LOOKUP_INTERVAL_S
        try:
            urls = await asyncio.to_thread(read_directory, self.role.directory)  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - without the directory, the circuit breaker still works
            log.info("llm role %s: replica directory unreadable (%s)", self.role_name, exc)
            return
        for endpoint, url in zip(self.endpoints, urls):
            if url and url != endpoint.config.base_url:
                endpoint.retarget(url)

    async def _send(self, endpoint: Endpoint, probe: bool, req: LLMRequest, params: dict[str, Any]) -> LLMResult:
        sent = {k: v for k, v in params.items() if v is not None}
        if endpoint.config.json_schema_via == "json_object" and "response_format" in sent:
            sent["response_format"] = _json_schema_as_json_object(sent["response_format"])
        endpoint.in_flight += 1
        try:
            async with endpoint.slots:
                resp = await endpoint.client.chat.completions.create(
                    model=endpoint.config.model, messages=req.messages, **sent)
            result = _to_result(resp, self.identity, endpoint.config.base_url)
        except BaseException as exc:
            if _is_throttle(exc):
                if probe:  # busy, not broken: back off per request, keep it in rotation
                    endpoint.released()
            elif is_retryable(exc):
                endpoint.failed(time.monotonic(), _describe(exc), probe)
            elif isinstance(exc, openai.APIStatusError):
                endpoint.succeeded()  # it answered: the request was wrong (400), not the server
            elif probe:
                endpoint.released()
            raise
        finally:
            endpoint.in_flight -= 1
        endpoint.succeeded()
        return result


def _json_schema_as_json_object(fmt: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's ``{type: json_schema, json_schema: {schema}}`` in llama.cpp's dialect ``{type: json_object, schema}``."""
    if fmt.get("type") != "json_schema":
        return fmt
    return {"type": "json_object", "schema": (fmt.get("json_schema") or {}).get("schema", {})}


def _to_result(resp: Any, identity: str, base_url: str) -> LLMResult:
    """A chat completion -> LLMResult; raises MalformedResponse (retried) when it is not one."""
    choices_in = getattr(resp, "choices", None)
    if not isinstance(choices_in, list) or not choices_in:
        raise MalformedResponse(f"no choices in the response of {base_url}: {str(resp)[:200]}")
    choices = []
    for ch in choices_in:
        message = getattr(ch, "message", None)
        content = getattr(message, "content", None) if message is not None else None
        if content is not None and not isinstance(content, str):
            raise MalformedResponse(f"choice content is {type(content).__name__}, not text")
        lp = getattr(ch, "logprobs", None)
        lp_content = getattr(lp, "content", None) if lp is not None else None
        choices.append(Choice(
            text=content or "", finish_reason=getattr(ch, "finish_reason", None),
            logprobs=[t.model_dump() if hasattr(t, "model_dump") else t for t in lp_content] if lp_content else None))
    usage = getattr(resp, "usage", None)
    return LLMResult(choices=choices, model=identity, endpoint=base_url,
                     prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
                     completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0))


def _merge(parts: list[LLMResult], n: int, key: str) -> LLMResult:
    """n single-choice answers (seeded requests) -> one result; an error in any part makes the whole an error."""
    merged = LLMResult(model=parts[0].model, endpoint=parts[0].endpoint, cache_key=key)
    for part in parts:
        merged.choices += part.choices
        merged.prompt_tokens += part.prompt_tokens
        merged.completion_tokens += part.completion_tokens
        merged.attempts += part.attempts
        merged.failovers += part.failovers
        if part.error and not merged.error:
            merged.error, merged.error_kind = part.error, part.error_kind
    merged.choices = merged.choices[:n]
    return merged
