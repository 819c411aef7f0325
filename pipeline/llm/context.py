"""A stage's access to its LLM roles inside one worker: ``self.llm`` on every ``Stage``.

* ``self.llm.client("teacher")``: the role's ``LLMClient``, built on first use from the resolved config the runner
  gave the worker (endpoints found, the embedded server started, ``max_concurrency`` already divided per actor).
* ONE event loop per worker (a daemon thread), shared by every role's client: ``async def aprocess(records)`` runs on
  it, so a stage can fan out to several generators, then a voter, then a summary, concurrently across the records
  of a batch. Requests to one server share one concurrency limit, whichever role sends them.
* ``self.llm.run(coro)`` runs a coroutine on that loop from plain code and returns its result.
* ``identity(role)``, ``role(role)``, ``local(role)``: the role's model identity (``identity.role_identity``, what the
  lineage and the stage key record) and its config; a ``local`` role is a policy the stage loads itself.

Only the roles the stage declared (``Stage.llm_roles``) are reachable: the runner started servers for those only.
Importing this module is cheap; the openai client is imported on the first ``client()`` call.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Awaitable, Iterable, TypeVar

from .config import LLMConfig, LocalPolicyConfig, RoleConfig
from .identity import role_identity
from .loop import LoopThread

if TYPE_CHECKING:
    from .client import LLMClient

T = TypeVar("T")


class LLMContext:
    def __init__(self, config: LLMConfig | None, roles: Iterable[str]):
        self.config = config or LLMConfig()
        self.roles = frozenset(roles)
        self._loop: LoopThread | None = None
        self._clients: dict[str, LLMClient] = {}
        self._slots: dict[str, asyncio.Semaphore] = {}  # one concurrency limit per server, across roles

    def role(self, name: str) -> RoleConfig:
        if name not in self.roles:
            declared = ", ".join(sorted(self.roles)) or "none"
            raise KeyError(f"LLM role {name!r} is not declared by the stage's llm_roles() (declared: {declared}); "
                           "the runner starts and checks servers for declared roles only")
        return self.config.role(name)

    def identity(self, name: str) -> str:
        """The role's model identity, as recorded in lineage, stage keys and the request cache."""
        return role_identity(self.role(name), self.config)

    def local(self, name: str) -> LocalPolicyConfig:
        """The in-process policy of a ``local`` role (base model, adapter), for the stage to load in ``setup``."""
        role = self.role(name)
        if role.local is None:
            raise ValueError(f"LLM role {name!r} is served over HTTP, not a local policy: use client({name!r})")
        return role.local

    def client(self, name: str) -> "LLMClient":
        """The role's client (one per role and worker), on the worker's event loop."""
        if name not in self._clients:
            from .cache import open_cache
            from .client import LLMClient

            role = self.role(name)
            if role.local is not None:
                raise ValueError(f"LLM role {name!r} is a local policy (llm.roles.{name}.local): load it in the "
                                 f"stage with self.llm.local({name!r}); it has no HTTP client")
            self._clients[name] = LLMClient(role, role_name=name, cache=open_cache(self.config.cache),
                                            loop=self.loop_thread, shared_slots=self._slots)
        return self._clients[name]

    @property
    def loop_thread(self) -> LoopThread:
        if self._loop is None:
            self._loop = LoopThread(name="stage-loop")
        return self._loop

    def run(self, coro: Awaitable[T]) -> T:
        """Run a coroutine on the worker's event loop and wait for its result (from plain, synchronous code)."""
        return self.loop_thread.run(coro)

    def stats(self) -> dict[str, Any]:
        """Per role: requests, cache hits, tokens, retries, errors (for a stage's log in ``close``)."""
        return {name: client.stats() for name, client in self._clients.items()}

    def close(self) -> None:
        """Close every client and stop the loop (the framework calls it after the stage's ``close``)."""
        for client in self._clients.values():
            client.close()
        self._clients.clear()
        if self._loop is not None:
            self._loop.stop()
            self._loop = None
