"""Asking a teacher for chains: one request with ``n`` per (record, style, teacher, route), every choice through the
gold check, a rejected choice asked again (with feedback, or resampled) until it is consistent or ``max_attempts``
tries were made. Nothing here raises on model output; a failed request is either permanent for the chain
(``bad_request``: a prompt too long for the model, an image sent to a text-only model) and recorded as the chain's
rejection, or transient (the endpoints are down, the retry budget is spent) and raised as ``TeacherUnavailable`` so
that the stage marks the record with an error a rerun can redo (answered requests come from the request cache)."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from gmner_pipeline.answer import Triple, format_turn
from gmner_pipeline.frames import FrameConfig
from gmner_pipeline.llm.request import BAD_REQUEST, LLMRequest, LLMResult

from .check import CheckConfig, Verdict, check_turn
from .config import TeacherStyleConfig
from .prompts import Messages, reask_messages
from .variation import request_seed

LLM_BAD_REQUEST = "llm_bad_request"
MISSING_CHOICE = "missing_choice"


class TeacherUnavailable(Exception):
    """A teacher request failed for a reason that may pass (endpoints down, retries or time budget spent)."""

    def __init__(self, teacher: str, result: LLMResult):
        super().__init__(f"teacher {teacher!r} ({result.model}) unavailable: {result.error_kind}: {result.error}")
        self.result = result


@dataclass(frozen=True)
class Job:
    """One request's worth of chains: a record's chains of one style, teacher and route."""

    style: str
    teacher: str  # the LLM role
    model_id: str  # the role's identity (llm.identity.role_identity)
    route: str
    seed: int  # the chain seed of (record, style, teacher, route)
    n: int
    base: Messages
    gold: tuple[Triple, ...]
    frame: FrameConfig
    size: tuple[int, int] | None
    style_key: str
    heldout: bool
    tag: str | None = None  # the record id, for logs


@dataclass
class Outcome:
    chains: list[dict[str, Any]] = field(default_factory=list)
    results: list[LLMResult] = field(default_factory=list)
    events: Counter[str] = field(default_factory=Counter)  # "reasks", "rejected:<reason>", ...


def make_chain(job: Job, *, seed: int, verdict: Verdict | None, attempts: int, tokens: tuple[float, float],
               seconds: float, rejection: str | None = None) -> dict[str, Any]:
    """A COT_CHAIN dict (original pixels everywhere). ``verdict`` None: no answer to judge (``rejection`` says why)."""
    think = verdict.think if verdict else ""
    answer = verdict.answer if verdict else ""
    return {
        "style": job.style, "route": job.route, "model_id": job.model_id, "seed": seed, "think": think,
        "answer": answer, "text": format_turn(think, answer) if verdict else "",
        "consistent": bool(verdict and verdict.consistent),
        "rejection": verdict.rejection if verdict else rejection, "attempts": attempts,
        "style_key": job.style_key, "prompt_tokens": round(tokens[0]), "completion_tokens": round(tokens[1]),
        "seconds": round(seconds, 4), "frame": job.frame.kind, "heldout": job.heldout,
    }


async def run_job(client: Any, job: Job, style: TeacherStyleConfig, check: CheckConfig) -> Outcome:
    """All ``job.n`` chains of a job, each judged and re-asked; raises ``TeacherUnavailable`` on a transient failure."""
    out = Outcome()
    first_seed = request_seed(job.seed)
    first = await client.acomplete(LLMRequest(messages=job.base, n=job.n, seed=first_seed, tag=job.tag))
    out.results.append(first)
    if not first.ok:
        if first.error_kind != BAD_REQUEST:
            raise TeacherUnavailable(job.teacher, first)
        out.events[f"rejected:{LLM_BAD_REQUEST}"] += job.n
        reason = f"{LLM_BAD_REQUEST}: {first.error}"
        share = (first.prompt_tokens / job.n, first.completion_tokens / job.n)
        out.chains = [make_chain(job, seed=first_seed, verdict=None, attempts=1, tokens=share,
                                 seconds=first.latency_s / job.n, rejection=reason) for _ in range(job.n)]
        return out
    choices = first.choices[:job.n]
    k = max(1, len(choices))
    share = (first.prompt_tokens / k, first.completion_tokens / k)

    async def one(index: int) -> dict[str, Any]:
        if index >= len(choices):  # a server that returned fewer choices and no top-up (should not happen)
            out.events[f"rejected:{MISSING_CHOICE}"] += 1
            return make_chain(job, seed=first_seed, verdict=None, attempts=1, tokens=(0, 0), seconds=0.0,
                              rejection=f"{MISSING_CHOICE}: the server returned {len(choices)} of {job.n} choices")
        choice = choices[index]
        text, seed, attempts = choice.text, first_seed, 1
        tokens, seconds = list(share), first.latency_s / k
        verdict = check_turn(text, job.gold, frame=job.frame, size=job.size, config=check,
                             finish_reason=choice.finish_reason)
        while not verdict.consistent and attempts < style.max_attempts:
            seed = request_seed(job.seed + index + 1, attempts)
            messages = (reask_messages(job.base, text, verdict, style.feedback_template) if style.feedback
                        else job.base)
            res = await client.acomplete(LLMRequest(messages=messages, n=1, seed=seed, tag=job.tag))
            out.results.append(res)
            out.events["reasks"] += 1
            if not res.ok:
                if res.error_kind != BAD_REQUEST:
                    raise TeacherUnavailable(job.teacher, res)
                out.events["reask_refused"] += 1  # e.g. the conversation outgrew the context: keep the last verdict
                break
            attempts += 1
            tokens[0] += res.prompt_tokens
            tokens[1] += res.completion_tokens
            seconds += res.latency_s
            text = res.text
            verdict = check_turn(text, job.gold, frame=job.frame, size=job.size, config=check,
                                 finish_reason=res.choices[0].finish_reason if res.choices else None)
        if not verdict.consistent:
            out.events[f"rejected:{verdict.reason}"] += 1
        return make_chain(job, seed=seed, verdict=verdict, attempts=attempts, tokens=(tokens[0], tokens[1]),
                          seconds=seconds)

    out.chains = list(await asyncio.gather(*(one(i) for i in range(job.n))))
    return out
