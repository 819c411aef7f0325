"""The LLM layer: one OpenAI-compatible client (failover, retries, cache, accounting) and the embedded local server.

Stages use it through ``self.llm`` (``context.LLMContext``: one event loop per worker, one client per role)::

    client = self.llm.client("teacher")
    results = await client.acomplete_many([LLMRequest(messages=...) for r in records])   # in aprocess()
    results = client.complete_many([LLMRequest(messages=...) for r in records])          # or in process()
    # result.ok / result.text / result.texts / result.error_kind / result.usage()

See docs/llm.md. Names are imported lazily: ``gmner_pipeline.config`` needs only ``llm.config``, and importing the
openai package costs about a second.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Accounting": "accounting", "lineage_usage": "accounting",
    "LLMClient": "client",
    "LLMContext": "context",
    "EndpointConfig": "config", "LLMConfig": "config", "LLMConfigError": "config", "LocalPolicyConfig": "config",
    "RoleConfig": "config", "SamplingConfig": "config",
    "role_identity": "identity",
    "image_part": "images", "user_message": "images",
    "Choice": "request", "LLMRequest": "request", "LLMResult": "request",
    "llm_services": "services",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
