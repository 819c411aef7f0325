"""The run plan: which stages run, in which folder each writes, and the keys that make outputs reusable.

A stage's key hashes its name, version, the record schema's major version, its config (without resources) and the
key of its input. So the folder ``<output_dir>/<stage>/<key>`` changes exactly when the stage or anything upstream
changes: an unchanged config recomputes nothing, and a new teacher for ``distill`` recomputes ``distill`` and what
follows while reusing retrieval, detections and knowledge.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError, RunConfig, _did_you_mean
from .hashing import stable_hash
from .schema import SCHEMA_MAJOR
from .stage import Stage, StageConfig
from .storage import is_remote, location

# 2: bad bytes, over-long lines and boxes without an image size are errors on their records; error-only blocks kept
INGEST_VERSION = "2"


@dataclass(frozen=True)
class StagePlan:
    name: str
    cls: type[Stage]
    config: StageConfig
    key: str
    upstream_key: str
    dir: Path
    llm: dict[str, Any] | None = None  # the LLM part of the key: per role its model identity and sampling

    def manifest(self) -> dict[str, Any]:
        out = {"stage": self.name, "version": self.cls.version, "key": self.key, "upstream_key": self.upstream_key,
               "schema_major": SCHEMA_MAJOR, "config": self.config.key_payload()}
        if self.llm is not None:  # which models a folder's outputs came from (gmner-pipeline teachers reads it)
            out["llm"] = self.llm
        return out


@dataclass(frozen=True)
class IngestPlan:
    key: str
    dir: Path
    source: dict[str, Any]
    shard_size: int


@dataclass(frozen=True)
class RunPlan:
    output_dir: Path
    ingest: IngestPlan
    stages: list[StagePlan]

    def stage(self, name: str) -> StagePlan:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def final_dir(self) -> Path:
        return self.stages[-1].dir if self.stages else self.ingest.dir


def source_fingerprint(source: Any, memo_dir: Path | None = None) -> str:
    """A fingerprint of the files a source reads (see fingerprint.py): with ``source.fingerprint: auto`` (the
    default) the annotation files by content and image folders by name, size and modification time; ``content``
    hashes images too, ``stat`` hashes nothing. Digests are memoised in ``memo_dir`` under each file's stat
    signature, so a rerun reads only the files that changed."""
    from .fingerprint import ANNOTATIONS, IMAGES, MEMO_FILE, fingerprint

    roots: list[tuple[Path, str]] = []
    if source.kind == "twitter_gmner":
        root = Path(source.path)
        roots += [(root / "txt", ANNOTATIONS), (root / "xml", ANNOTATIONS)]
        if source.image_dir:
            roots.append((Path(source.image_dir), IMAGES))
    elif source.kind == "conll":
        roots.append((Path(source.path), ANNOTATIONS))
    elif source.kind == "sample":
        roots.append((Path(__file__).resolve().parent / "sample", ANNOTATIONS))
    mode = getattr(source, "fingerprint", "auto")
    return fingerprint(roots, mode, memo_dir / MEMO_FILE if memo_dir is not None else None)


def llm_key_payload(config: RunConfig, roles: set[str]) -> dict[str, Any] | None:
    """What of the ``llm`` section decides an LLM-driven stage's answers: per role the model identity
    (``llm.identity.role_identity``: the same string the lineage and the request cache use) and the sampling, plus how
    images are sent. Endpoint URLs, concurrency, retries and the cache location are left out: moving to other
    replicas of the same model reuses the outputs, a new teacher (or another GGUF, another adapter) recomputes them."""
    if not roles:
        return None
    from gmner_pipeline.llm.config import LLMConfig
    from gmner_pipeline.llm.identity import role_identity

    llm = LLMConfig.coerce(config.llm)
    payload: dict[str, Any] = {"images": llm.images.model_dump(mode="json"), "roles": {}}
    for role in sorted(roles):
        rc = llm.role(role)
        payload["roles"][role] = {"model": role_identity(rc, llm), "sampling": rc.sampling.model_dump(mode="json"),
                                  "n_mode": rc.n_mode}
        if rc.frame.kind != "original":  # another frame means other prompts and answers (original keeps old keys)
            payload["roles"][role]["frame"] = rc.frame.model_dump(mode="json")
    return payload


def check_order(config: RunConfig, stages: list[tuple[str, type[Stage], StageConfig]]) -> None:
    """Refuse, before anything runs, a pipeline in which a stage reads a column group that neither the source nor an
    earlier stage provides (annotate on a source without images, distill before knowledge)."""
    available = set(config.source.provides())
    for name, cls, cfg in stages:
        missing = sorted(cls.reads_for(cfg) - available)
        if missing:
            source = config.source.kind
            if "image" in missing and source == "twitter_gmner":
                source += " without source.image_dir"
            raise ConfigError(f"stage {name!r} reads {', '.join(missing)}, which neither the source ({source}) nor a "
                              f"stage before it in the pipeline provides{_writers_hint(missing)}")
        available |= cls.writes


def _writers_hint(groups: list[str]) -> str:
    from gmner_pipeline.stages import STAGES, load_stage

    writers = []
    for name in STAGES:
        try:
            if load_stage(name).writes & set(groups):
                writers.append(name)
        except ImportError:
            continue
    return f": put {' or '.join(repr(w) for w in writers)} before it" if writers else ""


def output_location(output_dir: str) -> Path:
    """The output folder as every process will see it: an absolute local path, or a bucket URL (``storage.py``)."""
    if is_remote(output_dir):
        return location(output_dir)  # type: ignore[return-value]
    return Path(os.path.abspath(Path(output_dir).expanduser()))


def plan_run(config: RunConfig, stages: list[str] | None = None) -> RunPlan:
    """Plan the stages ``stages`` (default: ``config.pipeline``) over the configured source."""
    from gmner_pipeline.stages import load_stage

    # Absolute: actors on other nodes do not share the driver's working directory, and latest.json's folders must
    # still be found by ``status``/``show`` run from elsewhere.
    out = output_location(config.run.output_dir)
    source = config.source.model_dump(mode="json")
    ingest_key = stable_hash({"ingest": INGEST_VERSION, "schema_major": SCHEMA_MAJOR, "source": source,
                              "shard_size": config.run.shard_size,
                              "files": source_fingerprint(config.source, out / "cache")})
    ingest = IngestPlan(ingest_key, out / "ingest" / ingest_key, source, config.run.shard_size)

    names = stages if stages is not None else config.pipeline
    plans: list[StagePlan] = []
    upstream = ingest_key
    classes = [(name, load_stage(name)) for name in names]
    check_order(config, [(name, cls, config.stages.get(name) or cls.Config()) for name, cls in classes])
    for name, cls in classes:
        cfg = config.stages.get(name) or cls.Config()
        llm = llm_key_payload(config, cls.llm_roles(cfg))
        payload = {"stage": name, "version": cls.version, "schema_major": SCHEMA_MAJOR, "config": cfg.key_payload(),
                   "upstream": upstream, "seed": config.run.seed, "llm": llm}
        if "cot" in cls.writes:  # cot.split is the D1/D2 assignment: the dataset section decides it
            payload["dataset"] = config.dataset.model_dump(mode="json")
        key = stable_hash(payload)
        plans.append(StagePlan(name, cls, cfg, key, upstream, out / name / key, llm))
        upstream = key
    return RunPlan(out, ingest, plans)


def stages_for_command(config: RunConfig, target: str | None) -> list[str]:
    """``run synthesize`` -> the configured pipeline; ``run X`` -> the pipeline up to X, or X alone when the
    pipeline does not contain it (upstream outputs are reused through their keys either way)."""
    if target is None:
        return list(config.pipeline)
    if target in config.pipeline:
        return config.pipeline[: config.pipeline.index(target) + 1]
    from gmner_pipeline.stages import STAGES, UnknownStage, load_stage

    try:
        load_stage(target)
    except UnknownStage as exc:
        raise ConfigError(f"{exc.args[0]}{_did_you_mean(target, STAGES)}") from None
    except ImportError as exc:
        raise ConfigError(f"stage {target!r} cannot be imported: {exc}") from None
    return [target]
