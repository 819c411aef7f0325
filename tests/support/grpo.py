"""Helpers for grpo_filter tests: ``d2_record`` (a D2 record with a consistent chain, gold
"Alice Smith|PER|[10,5,50,70]" in a 100x80 image) and ``ScriptedPolicy``, an in-process OpenAI-compatible server
(``FakeOpenAI``) that answers each prompt with a scripted group of completions, so that every reward, and so every
keep/drop decision, is known."""

from __future__ import annotations

import json
from typing import Any, Callable

from gmner_pipeline.schema import empty_record
from gmner_pipeline.testing import FakeOpenAI

BOX = [10.0, 5.0, 50.0, 70.0]  # the gold box of "Alice Smith" in a 100x80 image
GOLD_ANSWER = "Alice Smith|PER|[10,5,50,70]"


def d2_record(key: str, *, split: str | None = "D2", consistent: bool = True, grounding: str = "present",
              source_split: str = "train") -> dict[str, Any]:
    """A record of the tweet "Alice Smith visits Paris <key>" whose CoT stage put it in ``split``."""
    return empty_record(
        id=f"toy/{source_split}/{key}", source="toy", split=source_split, sample_key=key,
        text=f"Alice Smith visits Paris {key}", tokens=["Alice", "Smith", "visits", "Paris", key],
        image={"path": None, "uri": None, "sha256": None, "width": 100, "height": 80}, grounding_labels=grounding,
        entities=[{"text": "Alice Smith", "start": 0, "end": 2, "type": "PER", "fine_type": None,
                   "boxes": [BOX] if grounding == "present" else []}],
        cot={"chains": [{"style": "template", "route": "entity_first", "model_id": None, "seed": 1, "think": "t",
                         "answer": GOLD_ANSWER, "text": f"<think>t</think><answer>{GOLD_ANSWER}</answer>",
                         "consistent": consistent, "rejection": None, "attempts": 1}],
             "split": split, "skipped": None})


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
