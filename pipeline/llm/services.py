"""What the runner wraps a run in: endpoints for every LLM role the run's stages declared.

    roles = set().union(*(stage_cls.llm_roles(cfg) for ...))
    with llm_services(run_config.llm, roles) as llm:        # starts the embedded server if some role needs it
        context.run_config["llm"] = llm.model_dump(mode="json")
        ...                                                  # workers: LLMClient.from_config(run_config["llm"], role)

Roles with endpoints are used as configured. Every needed role without endpoints gets the ONE embedded server (started
once, shared by those roles), which is stopped when the block exits: normally, on an exception, or on Ctrl-C.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Iterator

from .config import LLMConfig
from .embedded import EmbeddedServer

log = logging.getLogger(__name__)


class LLMConfigError(ValueError):
    """The LLM section cannot serve the run; the message says what to configure."""


def roles_without_endpoints(config: LLMConfig, roles: set[str]) -> list[str]:
    return sorted(r for r in roles if not config.role(r).endpoints)


@contextmanager
def llm_services(llm_config: LLMConfig | dict[str, Any] | None, roles: set[str]) -> Iterator[LLMConfig]:
    """Yield the LLM config with an endpoint for every role in ``roles`` (see the module docstring)."""
    config = LLMConfig.coerce(llm_config)
    missing = roles_without_endpoints(config, roles)
    if not missing:
        yield config
        return
    if not config.embedded.enabled:
        raise LLMConfigError(
            f"LLM roles {missing} have no endpoints and llm.embedded.enabled is false: add endpoints under "
            f"llm.roles.<role>.endpoints (base_url, model), or enable the embedded server")
    server = EmbeddedServer(config.embedded)
    log.info("LLM roles %s have no endpoints: starting the embedded server (%s)", missing, config.embedded.model_name)
    server.start()
    try:
        roles_cfg = dict(config.roles)
        for name in missing:
            role = config.role(name)
            roles_cfg[name] = role.model_copy(update={
                "endpoints": [server.endpoint()],
                "model_id": role.model_id or config.embedded.model_name,
                "revision": role.revision or server.revision,
            })
        yield config.model_copy(update={"roles": roles_cfg})
    finally:
        server.stop()
