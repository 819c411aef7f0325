"""Which model a role is: the ONE function that decides it, for the stage key, the lineage and the request cache.

``role_identity(role, llm)`` is, by the kind of role:

* **served** (``endpoints``, or an explicit ``model_id``): ``<model_id or the endpoints' model>[@<revision>]``, plus
  ``+adapter:<sha256 of the adapter folder, 12 hex>`` when ``adapter`` names the LoRA adapter the server applies.
  Endpoint URLs are not part of it: other replicas of the same model reuse outputs and cached answers.
* **managed** (``serve``: servers the pipeline starts on the cluster, ``replicas.py``): like served, with
  ``serve.served_model_name`` (default ``serve.model``) as the model name; so a role moved from listed endpoints to
  managed replicas of the same model keeps its outputs and cached answers.
* **embedded** (no endpoints, no ``local``: the pipeline's own llama.cpp server): ``<model_id or
  embedded.model_name>@<sha256 of the GGUF file, 12 hex>``, so pointing ``llm.embedded.model_path`` at another file
  is another model.
* **local** (``local: {base_model, adapter}``, a policy the stage loads in-process): ``local:<base_model>[@<rev>]``
  plus ``+adapter:<sha256 of the adapter folder, 12 hex>``; ``rev`` is ``local.revision``, else the content hash of
  ``base_model`` when it is a local folder.

Resolving a config for a run (``services.llm_services``: start the embedded server, hash folders once in the driver)
keeps every identity unchanged and makes it cheap to recompute in the workers; a unit test holds it to that.
"""

from __future__ import annotations

from pathlib import Path

from ..hashing import dir_sha256, file_sha256
from .config import LLMConfig, LLMConfigError, LocalPolicyConfig, RoleConfig

DIGEST_CHARS = 12


def role_kind(role: RoleConfig) -> str:
    """``local``, ``managed``, ``served`` or ``embedded`` (a role with none of endpoints, ``serve`` and ``local`` gets
    the embedded server)."""
    if role.local is not None:
        return "local"
    if role.serve is not None:
        return "managed"
    return "served" if role.endpoints else "embedded"


def role_identity(role: RoleConfig, llm: LLMConfig | None = None) -> str:
    """The model identity of a role (see the module docstring). ``llm`` is needed for an embedded role only."""
    kind = role_kind(role)
    if kind == "local":
        return local_identity(role.local)  # type: ignore[arg-type]
    if kind in ("served", "managed"):  # a resolved embedded or managed role is served, with its identity as model_id
        base = role.model_id or (role.serve.name() if role.serve is not None else role.endpoints[0].model)
        base = f"{base}@{role.revision}" if role.revision else base
        return base + adapter_suffix(role.adapter) if role.adapter else base
    return embedded_identity(role, llm or LLMConfig())


def embedded_identity(role: RoleConfig, llm: LLMConfig) -> str:
    from .embedded import EmbeddedServerError, locate_model  # the GGUF is fetched here on first use

    if not llm.embedded.enabled:
        raise LLMConfigError("an LLM role has no endpoints and llm.embedded.enabled is false: add endpoints under "
                             "llm.roles.<role>.endpoints (base_url, model), or enable the embedded server")
    try:
        path = locate_model(llm.embedded)
    except EmbeddedServerError as exc:
        raise LLMConfigError(str(exc)) from None
    return f"{role.model_id or llm.embedded.model_name}@{file_sha256(path)[:DIGEST_CHARS]}"


def local_identity(local: LocalPolicyConfig) -> str:
    base = Path(local.base_model).expanduser()
    revision = local.revision or (dir_sha256(base)[:DIGEST_CHARS] if base.exists() else None)
    identity = f"local:{local.base_model}" + (f"@{revision}" if revision else "")
    return identity + adapter_suffix(local.adapter) if local.adapter else identity


def adapter_suffix(adapter: str) -> str:
    """``+adapter:<sha256 of the folder, 12 hex>``: the part of an identity that names a LoRA adapter."""
    path = Path(adapter).expanduser()
    if not path.exists():
        raise LLMConfigError(f"policy adapter {path} does not exist: train it first (gmner-pipeline train), or fix "
                             "the role's adapter path (llm.roles.<role>.adapter or .local.adapter)")
    return f"+adapter:{dir_sha256(path)[:DIGEST_CHARS]}"


def resolved_local(local: LocalPolicyConfig) -> LocalPolicyConfig:
    """The same policy with its base revision filled in, so that workers never hash a large base model again."""
    if local.revision:
        return local
    base = Path(local.base_model).expanduser()
    return local.model_copy(update={"revision": dir_sha256(base)[:DIGEST_CHARS]}) if base.exists() else local
