"""Config validation errors a person can act on: each problem with its path as the user writes it, where it came
from (the YAML file or the ``--set`` that introduced it), and, for an unknown key, the closest known key.

Pydantic reports an error at a location such as ``('source', 'twitter_gmner', 'pathh')`` or
``('llm', 'roles', 'teacher', 'endpoints', 0, 'weigth')``; the user wrote ``source.pathh`` and
``llm.roles.teacher.endpoints[0].weigth``. ``explain`` walks the config model along the location to print the user's
path and to find the keys the model at that place does know (for the did-you-mean).
"""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from pydantic import BaseModel, ValidationError

Loc = tuple[Any, ...]


class SectionInvalid(Exception):
    """A section validated by a model of its own (a stage's ``Config`` under ``stages.<name>``) failed. Not a
    ``ValueError`` on purpose: pydantic would fold it into one error without the section's inner paths."""

    def __init__(self, prefix: Loc, model: type[BaseModel], error: ValidationError):
        super().__init__(str(error))
        self.prefix, self.model, self.error = prefix, model, error


@dataclass(frozen=True)
class Problem:
    path: str  # as the user writes it: run.shard_size, llm.roles.teacher.endpoints[0].model
    parts: tuple[str, ...]  # the same, as keys (list indices as strings), for matching --set keys
    message: str


def _unwrap(annotation: Any) -> Any:
    """Strip ``Annotated`` and ``Optional``; a union of models becomes ``{tag: model}`` by their ``kind`` literal."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return _unwrap(members[0])
        tagged = {}
        for m in members:
            m = _unwrap(m)
            if isinstance(m, type) and issubclass(m, BaseModel) and "kind" in m.model_fields:
                tagged[m.model_fields["kind"].default] = m
        return tagged or None
    return annotation


def _step(node: Any, part: Any) -> tuple[Any, str | None]:
    """The node one location part further down, and how that part shows in the user's path (None: not at all)."""
    if isinstance(node, dict):  # a tagged union: the tag is pydantic's, not the user's
        return node.get(part), None
    origin = typing.get_origin(node)
    if isinstance(part, int) and origin in (list, tuple):
        return _unwrap(typing.get_args(node)[0]), f"[{part}]"
    if origin is dict:
        return _unwrap(typing.get_args(node)[1]), f".{part}"
    if isinstance(node, type) and issubclass(node, BaseModel) and part in node.model_fields:
        return _unwrap(node.model_fields[part].annotation), f".{part}"
    return None, (f"[{part}]" if isinstance(part, int) else f".{part}")


def _walk(model: type[BaseModel], loc: Loc) -> tuple[str, tuple[str, ...], Any]:
    """(user path, user keys, the node that holds the last part)."""
    node: Any = model
    path, parts = "", []
    parent = node
    for part in loc:
        parent = node
        node, shown = _step(node, part)
        if shown is not None:
            path += shown
            parts.append(str(part))
    return path.lstrip("."), tuple(parts), parent


def _known_keys(node: Any) -> list[str]:
    if isinstance(node, type) and issubclass(node, BaseModel):
        return list(node.model_fields)
    return []


def did_you_mean(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def problems(error: ValidationError, model: type[BaseModel], prefix: Loc = ()) -> list[Problem]:
    out = []
    for err in error.errors():
        loc = tuple(err["loc"])
        path, parts, parent = _walk(model, loc)
        if prefix:
            head, head_parts, _ = _walk_plain(prefix)
            path, parts = f"{head}.{path}" if path else head, head_parts + parts
        if err["type"] == "extra_forbidden":
            known = _known_keys(parent)
            hint = did_you_mean(str(loc[-1]), known)
            if not hint and known:
                hint = f" (known here: {', '.join(known)})"
            message = f"unknown key{hint}"
        else:
            message = err["msg"]
        out.append(Problem(path or "(root)", parts, message))
    return out


def _walk_plain(prefix: Loc) -> tuple[str, tuple[str, ...], None]:
    return ".".join(str(p) for p in prefix), tuple(str(p) for p in prefix), None


def _origin(problem: Problem, overrides: Sequence[tuple[str, list[str]]], source: Path | None) -> str:
    """The last ``--set`` whose key is this path or a part of it (or holds it), else the file, else the defaults."""
    for item, keys in reversed(list(overrides)):
        n = min(len(keys), len(problem.parts))
        if n and tuple(keys[:n]) == problem.parts[:n]:
            return f"--set {item}"
    return str(source) if source else "the built-in defaults"


def explain(error: ValidationError | SectionInvalid, model: type[BaseModel], source: Path | None = None,
            overrides: Sequence[tuple[str, list[str]]] = ()) -> str:
    """The message of a ``ConfigError``: one line per problem, grouped by where it came from."""
    if isinstance(error, SectionInvalid):
        found = problems(error.error, error.model, error.prefix)
    else:
        found = problems(error, model)
    by_origin: dict[str, list[Problem]] = {}
    for p in found:
        by_origin.setdefault(_origin(p, overrides, source), []).append(p)
    lines = []
    for origin, items in by_origin.items():
        lines.append(f"invalid config ({origin}):")
        lines += [f"  {p.path}: {p.message}" for p in items]
    if any("unknown key" in p.message for p in found):
        lines.append("  (remove unknown keys, or fix their spelling: README 'Configuration' and docs/ list them)")
    return "\n".join(lines)
