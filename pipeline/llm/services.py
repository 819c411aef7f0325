"""What the runner wraps a run in: endpoints for every LLM role the run's stages declared.

    roles = set().union(*(stage_cls.llm_roles(cfg) for ...))
    with llm_services(config.llm, roles) as llm:            # starts the embedded server if some role needs it
        llm = divide_concurrency(llm, [(roles_of_stage, pool_size), ...])
        ...                                                  # each stage's StageContext.llm; workers: Stage.llm

Roles with endpoints are used as configured, after a preflight check (``check_endpoints``): a role fails before the run
when none of its endpoints answers ``GET /models`` listing its model (one dead replica is only a warning). Roles with
``serve`` get their replicas started on the Ray cluster (``replicas.ManagedReplicas``; Ray must be initialised: the
runner starts it first), their endpoints filled in and a ``directory`` where the client finds a replica that moved.
Every other needed role without endpoints gets the ONE embedded server (started once, shared by those roles). Servers
and replicas are stopped when the block exits: normally, on an exception, or on Ctrl-C.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from collections import Counter
from contextlib import ExitStack, contextmanager
from typing import Any, Iterable, Iterator

from .config import EndpointConfig, LLMConfig, LLMConfigError
from .embedded import EmbeddedServer
from .identity import resolved_local, role_identity, role_kind

log = logging.getLogger(__name__)

__all__ = ["LLMConfigError", "check_endpoints", "divide_concurrency", "endpoint_problem", "llm_services",
           "resolve_roles"]


def managed_roles(config: LLMConfig, roles: set[str]) -> list[str]:
    """The roles whose servers the pipeline starts on the Ray cluster (``serve``)."""
    return sorted(r for r in roles if role_kind(config.role(r)) == "managed")


def roles_without_endpoints(config: LLMConfig, roles: set[str]) -> list[str]:
    """The roles the embedded server must serve (local policies need no server)."""
    return sorted(r for r in roles if role_kind(config.role(r)) == "embedded")


def resolve_roles(config: LLMConfig, roles: set[str], embedded: EndpointConfig | None = None,
                  managed: dict[str, tuple[list[EndpointConfig], str]] | None = None) -> LLMConfig:
    """The config a run's workers get: every role in ``roles`` explicit, the embedded ones pointed at ``embedded``
    with their identity as ``model_id``, the managed ones at their replicas (``managed``: per role, its endpoints and
    directory) with their served name as ``model_id``; local policies with their base revision filled in. Each role's
    ``role_identity`` is unchanged by this (and cheap to recompute in a worker)."""
    resolved = dict(config.roles)
    for name in sorted(roles):
        role = config.role(name)
        kind = role_kind(role)
        if kind == "embedded":
            if embedded is None:
                raise LLMConfigError(f"LLM role {name!r} needs the embedded server, which is not running")
            role = role.model_copy(update={"endpoints": [embedded], "model_id": role_identity(role, config),
                                           "revision": None})
        elif kind == "managed":
            if managed is None or name not in managed:
                raise LLMConfigError(f"LLM role {name!r} needs its managed replicas, which are not running")
            endpoints, directory = managed[name]
            # the served name as model_id: revision and adapter stay, so role_identity is what it was
            role = role.model_copy(update={"endpoints": endpoints, "directory": directory, "serve": None,
                                           "model_id": role.model_id or role.serve.name()})  # type: ignore[union-attr]
        elif kind == "local":
            role = role.model_copy(update={"local": resolved_local(role.local)})  # type: ignore[arg-type]
        resolved[name] = role
    return config.model_copy(update={"roles": resolved})


def divide_concurrency(config: LLMConfig, pools: Iterable[tuple[set[str], int]]) -> LLMConfig:
    """The config one actor gets: ``max_concurrency`` bounds the requests in flight to an endpoint (a base URL)
    across the whole run, so each actor that may call it gets ``max_concurrency // actors`` (at least 1: with more
    actors than that, the bound is the number of actors). ``pools``: per stage, its LLM roles and its pool size; every
    pool counts, since stages run at the same time. Inside an actor, the roles calling one server share the limit
    (``context.LLMContext``)."""
    actors: Counter[str] = Counter()
    for roles, pool_size in pools:
        for url in {e.base_url for r in roles for e in config.role(r).endpoints}:
            actors[url] += pool_size
    limit: dict[str, int] = {}
    for role in config.roles.values():
        for e in role.endpoints:
            limit[e.base_url] = min(limit.get(e.base_url, e.max_concurrency), e.max_concurrency)

    def share(e: EndpointConfig) -> EndpointConfig:
        if not actors[e.base_url]:
            return e
        return e.model_copy(update={"max_concurrency": max(1, limit[e.base_url] // actors[e.base_url])})

    roles = {name: role.model_copy(update={"endpoints": [share(e) for e in role.endpoints]})
             for name, role in config.roles.items()}
    return config.model_copy(update={"roles": roles})


def endpoint_problem(endpoint: EndpointConfig, timeout: float = 5.0) -> str | None:
    """None when the endpoint answers ``GET /models`` and lists its model; else what is wrong, in words."""
    try:
        key = endpoint.api_key()
    except ValueError as exc:
        return str(exc)
    req = urllib.request.Request(endpoint.base_url + "/models", headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            listed = [m.get("id") for m in json.load(resp).get("data", [])]
    except urllib.error.HTTPError as exc:
        return f"{endpoint.base_url}/models answered HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ValueError, AttributeError) as exc:
        return f"{endpoint.base_url} is unreachable ({getattr(exc, 'reason', exc)})"
    if listed and endpoint.model not in listed:
        return f"{endpoint.base_url} does not serve model {endpoint.model!r}; it serves {listed}"
    return None


def check_endpoints(config: LLMConfig, roles: set[str], timeout: float = 5.0) -> None:
    """Preflight: raise ``LLMConfigError`` for a role none of whose endpoints works; warn about dead replicas."""
    errors = []
    for name in sorted(roles):
        role = config.role(name)
        problems = [p for p in (endpoint_problem(e, timeout) for e in role.endpoints) if p]
        if role.endpoints and len(problems) == len(role.endpoints):
            errors.append(f"llm.roles.{name}: no endpoint works: " + "; ".join(problems))
        for problem in problems if len(problems) < len(role.endpoints) else []:
            log.warning("llm.roles.%s: %s (the other replicas carry the load; it is probed again during the run)",
                        name, problem)
    if errors:
        raise LLMConfigError("\n".join(errors) + "\nStart the servers, fix base_url/model, or remove the endpoints "
                             "to use the embedded local server.")


@contextmanager
def llm_services(llm_config: LLMConfig | dict[str, Any] | None, roles: set[str], *,
                 check: bool = True) -> Iterator[LLMConfig]:
    """Yield the LLM config with an endpoint for every role in ``roles`` (see the module docstring)."""
    config = LLMConfig.coerce(llm_config)
    if check:
        check_endpoints(config, {r for r in roles if config.role(r).endpoints})
    missing = roles_without_endpoints(config, roles)
    serve_roles = managed_roles(config, roles)
    if missing and not config.embedded.enabled:
        raise LLMConfigError(
            f"LLM roles {missing} have no endpoints and llm.embedded.enabled is false: add endpoints under "
            f"llm.roles.<role>.endpoints (base_url, model), or enable the embedded server")
    with ExitStack() as stack:
        managed = None
        if serve_roles:
            from .replicas import ManagedReplicas  # imports Ray: only for roles the pipeline serves on the cluster

            replicas = ManagedReplicas({r: config.role(r).serve for r in serve_roles})  # type: ignore[misc]
            log.info("LLM roles %s: starting their replicas on the Ray cluster", serve_roles)
            stack.callback(replicas.stop)
            managed = {r: (eps, replicas.directory_address(r)) for r, eps in replicas.start().items()}
        embedded = None
        if missing:
            server = EmbeddedServer(config.embedded)
            log.info("LLM roles %s have no endpoints: starting the embedded server (%s)", missing,
                     config.embedded.model_name)
            stack.callback(server.stop)
            server.start()
            embedded = server.endpoint()
        yield resolve_roles(config, roles, embedded, managed)
