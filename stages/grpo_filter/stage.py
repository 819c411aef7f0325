"""The grpo_filter stage: G samples per D2 record from the SFT policy, scored with the verifiable rewards, and the
keep/drop decision of MCR's reward-statistics filter (docs/grpo_filter.md)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from gmner_pipeline import student
from gmner_pipeline.configbase import Strict
from gmner_pipeline.frames import FrameError
from gmner_pipeline.llm.request import TRANSIENT_KINDS
from gmner_pipeline.prompts import PROMPTS_DIR, prompt_hash
from gmner_pipeline.scoring import GrpoFilterConfig, RewardConfig
from gmner_pipeline.stage import Record, Stage, StageConfig, mark_error
from gmner_pipeline.student import StudentPromptConfig

from .groups import INCOMPLETE, group_column, image_size, record_gold, score_group, skip_reason, wants_group, zero_kind
from .policy import LocalOptions, LocalPolicy, Sampling, Samples, ServedPolicy

STUDENT_TEMPLATES = "student"


class LocalSamplerConfig(Strict):
    """How a ``local`` policy role runs in the worker (``train.sampler.LocalPolicySampler``)."""

    device: str = Field("auto", description="auto (cuda when available, else cpu), cpu, cuda, cuda:1, ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on a GPU that supports it, else float32")
    batch_size: int = Field(8, ge=1, description="prompts per generate() call (each with G samples)")


class GrpoFilterStageConfig(StageConfig):
    """MCR App. D.3 / E.4: G = 8 samples at temperature 1.5, top-k 200, top-p 0.95; keep iff std >= 0.1, max >= 0.8
    and 0.08 <= median <= 0.6 of the G rewards."""

    role: str = Field("policy", description="the LLM role of the SFT policy (llm.roles.<role>): served endpoints, "
                      "or local: {base_model, adapter} for the in-process sampler")
    samples: int = Field(8, ge=2, description="G: responses sampled per record")
    temperature: float = Field(1.5, ge=0)
    top_k: int | None = Field(200, ge=1, description="sent in the request's extra body (vLLM, llama.cpp)")
    top_p: float | None = Field(0.95, gt=0, le=1)
    max_tokens: int = Field(1024, ge=1, description="per response (the GRPO preset's max_completion_length)")
    seed: int = Field(0, description="added to the run seed; each record's requests are seeded from both and its id")
    prompt: dict[str, Any] = Field(
        default_factory=dict, description="StudentPromptConfig fields over the SFT adapter's own (gmner_policy.json); "
        "set the same ones as the GRPO trainer's prompt section, so both see one prompt")
    reward: RewardConfig = Field(default_factory=RewardConfig, description="the verifiable reward: keep it equal to "
                                 "the GRPO trainer's reward section")
    filter: GrpoFilterConfig = Field(default_factory=GrpoFilterConfig, description="the keep rule's thresholds")
    local: LocalSamplerConfig = Field(default_factory=LocalSamplerConfig, description="in-process policies only")

    @field_validator("prompt")
    @classmethod
    def _prompt_fields(cls, prompt: dict[str, Any]) -> dict[str, Any]:
        StudentPromptConfig.model_validate(prompt)  # unknown or invalid fields fail at config load
        return prompt

    def sampling(self) -> Sampling:
        return Sampling(n=self.samples, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                        max_tokens=self.max_tokens)

    def key_payload(self) -> dict[str, Any]:
        """Also the student templates' text: editing the prompt recomputes the groups."""
        names = sorted(p.relative_to(PROMPTS_DIR).as_posix() for p in (PROMPTS_DIR / STUDENT_TEMPLATES).glob("*")
                       if p.is_file())
        return {**super().key_payload(), "student_templates": prompt_hash(*names)}


def record_seed(run_seed: int, offset: int, record_id: str) -> int:
    """A 31-bit seed per record (servers take 32-bit seeds), stable across runs, processes and machines."""
    digest = hashlib.sha256(f"{run_seed}\x1f{offset}\x1f{record_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") >> 1


class GrpoFilterStage(Stage):
    """Samples G answers per D2 record from the policy, scores each with the project reward, and keeps the records
    whose reward group is informative for GRPO (``grpo.keep``); publish writes those as ``dataset/D2_filtered``."""

    name = "grpo_filter"
    version = "1"
    Config = GrpoFilterStageConfig
    reads = frozenset({"cot"})
    writes = frozenset({"grpo"})

    config: GrpoFilterStageConfig

    @classmethod
    def llm_roles(cls, config: StageConfig) -> set[str]:
        return {config.role}  # type: ignore[attr-defined]

    def accepts(self, record: Record) -> bool:
        return wants_group(record)

    def setup(self) -> None:
        cfg = self.config
        role = self.llm.role(cfg.role)
        self.policy_id = self.llm.identity(cfg.role)
        self.policy: ServedPolicy | LocalPolicy
        if role.local is not None:
            self.policy = LocalPolicy(role.local, LocalOptions(**cfg.local.model_dump()), cfg.prompt, cfg.sampling())
        else:
            self.policy = ServedPolicy(self.llm.client(cfg.role), ServedPolicy.prompt_for(role.adapter, cfg.prompt),
                                       cfg.sampling(), self.llm.config.images)
        self.prompt = self.policy.prompt
        self.model_ids = [self.policy_id]
        self.prompt_hash = student.prompt_hash(self.prompt)

    async def aprocess(self, records: list[Record]) -> list[Record]:
        todo: list[tuple[Record, Any, list]] = []
        for record in records:
            reason = skip_reason(record)
            if reason is not None:
                self.count(f"skipped:{reason}")
                continue
            try:
                messages = student.build_messages(record, self.prompt)
                payload = self.policy.prepare(messages)
                gold = record_gold(record, self.config.reward.types)
            except (ValueError, FrameError) as exc:  # no image on disk, unreadable image, gold that cannot be scored
                mark_error(record, self.name, str(exc))
                self.count("bad_record")
                continue
            todo.append((record, payload, gold))
        seeds = [record_seed(self.context.seed, self.config.seed, r["id"]) for r, _, _ in todo]
        groups = await self.policy.sample([p for _, p, _ in todo], seeds)
        for (record, _, gold), group in zip(todo, groups):
            self._finish(record, gold, group)
        return records

    def _finish(self, record: Record, gold: list, group: Samples) -> None:
        cfg = self.config
        breakdowns = score_group(group.texts, gold, image_size(record), self.prompt.frame, cfg.reward)
        outcome = group_column(group.texts, breakdowns, cfg.samples, self.policy_id, cfg.filter)
        record["grpo"] = outcome.column
        self.count("responses", len(group.texts))
        for b in breakdowns:
            if b is not None and b.total == 0.0:
                self.count("zero_reward")
            kind = zero_kind(b) if b is not None else None
            if kind:
                self.count(f"zeroed:{kind}")
        if not outcome.complete:
            why = f"{group.error_kind}: {group.error}" if group.error else "the policy returned too few samples"
            mark_error(record, self.name, f"{INCOMPLETE}: {len(group.texts)} of {cfg.samples} samples came back "
                                          f"({why}); rerun the stage once the policy answers",
                       transient=group.error_kind in TRANSIENT_KINDS)
            self.count(f"{INCOMPLETE}:{group.error_kind or 'short'}")
        elif outcome.column["keep"]:
            self.count("kept")
        else:
            self.count(f"dropped:{outcome.column['reason']}")
        if group.results:
            self.usage(record, results=group.results)
        else:
            self.usage(record, completion_tokens=group.completion_tokens)

    @classmethod
    def after_run(cls, config: StageConfig, stage_dir: Path, output_dir: Path) -> dict[str, Any] | None:
        """The filter report and its histograms under ``<output>/reports/`` (report.py)."""
        from .report import write_report

        return write_report(stage_dir, output_dir, config.filter)  # type: ignore[attr-defined]
