"""A tiny LLM stage for tests, smoke runs and chaos runs: one request per record to the ``teacher`` role.

``AskTeacherStage`` sends each record's text, keeps the answer as the record's one ``knowledge`` item, records the
request's usage in the lineage, and marks a failed request as an error of the kind the client reported (transient
when the servers were down, permanent when the request itself was refused): the smallest stage that exercises the LLM
client, failover, retries and the repair of transient errors through the real runner. Use it as
``pipeline: ["gmner_pipeline.testing.stages:AskTeacherStage"]``.
"""

from __future__ import annotations

from pydantic import Field

from ..llm.request import LLMRequest
from ..stage import Record, Stage, StageConfig, mark_error


class AskTeacherConfig(StageConfig):
    max_tokens: int = Field(8, ge=1, description="tokens per answer")
    role: str = Field("teacher", description="the LLM role asked")


class AskTeacherStage(Stage):
    name = "ask_teacher"
    version = "1"
    Config = AskTeacherConfig
    writes = frozenset({"knowledge"})

    config: AskTeacherConfig

    @classmethod
    def llm_roles(cls, config: StageConfig) -> set[str]:
        return {config.role}  # type: ignore[attr-defined]

    async def aprocess(self, records: list[Record]) -> list[Record]:
        client = self.llm.client(self.config.role)
        results = await client.acomplete_many(
            [LLMRequest(messages=[{"role": "user", "content": r.get("text") or ""}], max_tokens=self.config.max_tokens,
                        tag=r["id"]) for r in records])
        for record, res in zip(records, results):
            self.usage(record, results=[res])
            if not res.ok:
                self.count(f"request_failed:{res.error_kind}")
                mark_error(record, self.name, f"{self.config.role}: {res.error}", transient=res.transient)
                continue
            if res.retries:
                self.count("request_retried")
            record["knowledge"] = [{"entity": "answer", "type": "OTHER", "fine_type": None, "knowledge": res.text,
                                    "answers": [], "voted": None, "cache_key": res.cache_key}]
        return records
