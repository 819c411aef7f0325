"""Test helpers for stage authors (this package's tests use them too).

* ``run_stage(StageCls, records, config=..., llm=...)``: run a stage on in-memory records the way a worker does
  (``setup`` once, batches through the framework, ``close``), with the output checked against the record schema.
* ``FakeOpenAI`` / ``Fault``: an in-process OpenAI-compatible chat server with scripted faults (429, 5xx, malformed
  or truncated bodies, dropped connections, slow answers), for testing an LLM stage offline. Real-server behaviour is
  covered by this project's integration tests (vLLM, llama.cpp).
* ``gmner_pipeline.testing.stages:AskTeacherStage``: a tiny LLM stage (one request per record) for smoke and fault runs.
* ``gmner_pipeline.testing.chaos``: real replicas to kill, stop and restart (``Replicas``), and this process's own Ray
  workers (``own_ray_workers``), for chaos tests.
"""

from .fake_openai import Fault, FakeOpenAI
from .harness import run_stage

__all__ = ["Fault", "FakeOpenAI", "run_stage"]
