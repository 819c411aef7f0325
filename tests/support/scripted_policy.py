"""A policy server for grpo_filter tests: an in-process OpenAI-compatible server (``FakeOpenAI``) that answers each
prompt with a scripted group of completions, so that every reward, and so every keep/drop decision, is known."""

from __future__ import annotations

import json
from typing import Any, Callable

from gmner_pipeline.testing import FakeOpenAI


class ScriptedPolicy(FakeOpenAI):
    """``script(prompt_json) -> completions``: the group for the request's prompt (the messages as JSON). A request
    with ``n`` gets the next ``n`` completions of its prompt's group (cycling), so a server that ignores ``n``
    (``honor_n=False``, like llama.cpp) hands the group out one completion per request."""

    def __init__(self, script: Callable[[str], list[str]] | dict[str, list[str]], **kw: Any):
        super().__init__(model=kw.pop("model", "policy"), **kw)
        if isinstance(script, dict):
            table = script
            script = lambda prompt: next(g for k, g in table.items() if k in prompt)  # noqa: E731
        self.script = script
        self.served: dict[str, int] = {}

    def completion(self, body: dict[str, Any]) -> dict[str, Any]:
        out = super().completion(body)
        prompt = json.dumps(body["messages"], ensure_ascii=False)
        group = self.script(prompt)
        with self._lock:
            start = self.served.get(prompt, 0)
            self.served[prompt] = start + len(out["choices"])
        for i, choice in enumerate(out["choices"]):
            choice["message"]["content"] = group[(start + i) % len(group)]
        return out
