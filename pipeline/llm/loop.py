"""An event loop in a daemon thread: how synchronous code (a stage's ``process``, the client's sync facade) runs
coroutines, and what ``aprocess`` runs on. One per worker (``LLMContext``), or one per client used on its own."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from typing import Awaitable, TypeVar

T = TypeVar("T")


class LoopThread:
    def __init__(self, name: str = "llm-client-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Awaitable[T]) -> T:
        """Run ``coro`` on the loop and wait for its result. Safe from any other thread, including one that runs an
        event loop of its own; from the loop's own thread (a sync call inside ``aprocess``) it would wait forever."""
        if threading.current_thread() is self._thread:
            if asyncio.iscoroutine(coro):
                coro.close()
            raise RuntimeError("a blocking LLM call inside a coroutine on the same loop would wait forever: inside "
                               "aprocess use `await client.acomplete(...)` / `acomplete_many(...)`")
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]
        return fut.result()

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)
        if not self.loop.is_running():
            self.loop.close()
