"""Typed run configuration: YAML -> pydantic models, ``--set a.b=c`` overrides, unknown keys rejected with a hint.

The root ``RunConfig`` holds the run settings, the source to ingest, the ordered list of stages, and one section per
stage under ``stages:``. Each stage section is validated by that stage's own ``Config`` model (see stages/__init__.py),
so every key anywhere in the file is checked before anything runs.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from .card.config import CardConfig
from .config_errors import SectionInvalid, did_you_mean, explain
from .configbase import ConfigError, Strict
from .llm.config import LLMConfig
from .splits import DatasetConfig
from .stage import StageConfig

__all__ = ["ConfigError", "RunConfig", "load_config", "parse_override", "bundled_config_path"]

# Ray refuses a smaller object store (ray_constants.OBJECT_STORE_MINIMUM_MEMORY_BYTES); checked here, before Ray starts.
OBJECT_STORE_MIN_BYTES = 75 * 1024 * 1024


# --- sources ---------------------------------------------------------------------------------------------------------

class _SourceChecks(Strict):
    """Settings every file-reading source shares: limits that keep one bad file from costing a run, and what an
    empty split means."""

    max_line_bytes: int = Field(64 * 1024, ge=64, description="a longer text line is an error on its record, "
                                "and is never read whole (a CoNLL line holds one token and its label)")
    empty_split: Literal["warn", "error"] = Field(
        "warn", description="a configured split that yields no records: a warning in the run summary, or an error "
        "that stops the run after ingest")
    fingerprint: Literal["auto", "content", "stat"] = Field(
        "auto", description="what the ingest key reads of the source files: 'auto' hashes the annotation files' "
        "contents and only stats image folders, 'content' hashes images too, 'stat' only stats everything (names, "
        "sizes, modification times); contents are re-hashed only for files whose stat changed")


class TwitterGmnerSource(_SourceChecks):
    """Twitter-GMNER layout: ``<path>/txt/{split}.txt`` (CoNLL with IMGID lines) and ``<path>/xml/<id>.xml``."""

    kind: Literal["twitter_gmner"] = "twitter_gmner"
    path: str = Field(..., description="folder holding txt/ and xml/")
    splits: list[str] = Field(default_factory=lambda: ["train"])
    image_dir: str | None = Field(None, description="folder with <IMGID>.jpg; optional (annotations-only ingest)")
    name: str = "twitter-gmner-v2"
    limit: int | None = Field(None, ge=1, description="ingest only the first N samples per split (for trials)")
    max_xml_bytes: int = Field(1024 * 1024, ge=1024, description="a larger XML file is an error on its record "
                               "(Twitter-GMNER's are about 1 KB)")

    @field_validator("splits")
    @classmethod
    def _distinct_splits(cls, splits: list[str]) -> list[str]:
        # a repeated split would ingest its ids twice, which ingest refuses mid-way with a traceback
        if len(set(splits)) != len(splits):
            raise ValueError(f"a split appears twice: {splits}")
        return splits

    def provides(self) -> frozenset[str]:
        """Column groups (schema.COLUMN_GROUPS) the source fills: images only with an ``image_dir``."""
        return frozenset({"image"}) if self.image_dir else frozenset()


class SampleSource(_SourceChecks):
    """The small sample that ships inside the package (photos materialised from scikit-image / matplotlib)."""

    kind: Literal["sample"] = "sample"
    name: str = "gmner-sample"
    limit: int | None = Field(None, ge=1)

    def provides(self) -> frozenset[str]:
        return frozenset({"image"})


class ConllSource(_SourceChecks):
    """A text-only CoNLL BIO file (token<TAB or space>label per line), with a label mapping to the target types."""

    kind: Literal["conll"] = "conll"
    path: str
    name: str = "conll"
    split: str = "train"
    label_map: dict[str, str] = Field(
        default_factory=dict,
        description="source label -> target coarse type; labels mapped to '' or missing (when strict_labels is false) "
        "are dropped from the entity list",
    )
    strict_labels: bool = Field(False, description="error on a label that label_map does not cover")
    limit: int | None = Field(None, ge=1)

    def provides(self) -> frozenset[str]:
        return frozenset()  # text only: retrieve pairs sentences with images


Source = Annotated[Union[TwitterGmnerSource, SampleSource, ConllSource], Field(discriminator="kind")]


# --- run -------------------------------------------------------------------------------------------------------------

class RunSettings(Strict):
    output_dir: str = Field("gmner-output", description="where shards, markers, the resolved config and reports go")
    shard_size: int = Field(256, ge=1, description="records per shard: the unit of work and of recovery")
    seed: int = 0
    ray_address: str | None = Field(None, description="join an existing Ray cluster (else RAY_ADDRESS, else local)")
    ray_connect_timeout_s: float = Field(10.0, gt=0, description="how long to wait for ray_address to answer "
                                         "before the run fails (checked before anything runs)")
    num_cpus: float | None = Field(None, gt=0, description="CPUs for a local Ray instance (default: all)")
    object_store_memory: int | None = Field(
        None, ge=OBJECT_STORE_MIN_BYTES, description="bytes for a local Ray object store (Ray's minimum: 75 MiB)")
    max_error_share: float = Field(
        0.5, ge=0, le=1, description="the run fails (exit 1) when more than this share of its records ends with "
        "status 'error' (a missing image folder, a dead endpoint); 1 never fails on errors")
    progress: bool = True
    shard_attempts: int = Field(3, ge=1, description="driver-level tries per shard before it is reported as failed")
    actor_restarts: int = Field(3, ge=0, description="Ray restarts of a dead stage worker (each retries its shard)")
    executor: Literal["ray", "local"] = Field(
        "ray", description="'ray': actor pools on a local Ray instance or a cluster; 'local': every stage in the "
        "driver's own process, one shard at a time (a debugger, tiny runs; see docs/architecture.md)")
    ray_dashboard: bool = Field(
        False, description="start Ray's dashboard and autoscaler monitor with a local Ray instance (a run needs "
        "neither; leaving them out saves seconds of start-up and a few hundred MB)")
    shard_timeout_s: float | None = Field(
        None, gt=0, description="a shard running longer than this is abandoned: its worker is ended and the shard "
        "retried like a crashed one (none by default)")
    stall_timeout_s: float | None = Field(
        3600.0, gt=0, description="a shard whose worker finishes no batch for this long (stuck, or its process "
        "stopped) is abandoned and retried the same way; raise it for stages with very long batches")
    redo_errors: Literal["transient", "all", "none"] = Field(
        "transient", description="errors in committed shards that a rerun redoes (only those records, the shard "
        "rewritten whole): 'transient' (dead endpoints, timeouts, OOM), 'all', or 'none'")


class RunConfig(Strict):
    run: RunSettings = Field(default_factory=RunSettings)
    source: Source = Field(default_factory=SampleSource)
    pipeline: list[str] = Field(default_factory=lambda: ["template_cot"], description="stages to run, in order")
    stages: dict[str, Any] = Field(default_factory=dict, description="one section per stage, validated by the stage")
    llm: LLMConfig = Field(default_factory=LLMConfig, description="LLM endpoints per role (see docs/llm.md)")
    dataset: DatasetConfig = Field(default_factory=DatasetConfig, description="the D1 (SFT) / D2 (GRPO) split")
    card: CardConfig = Field(default_factory=CardConfig, description="the dataset card <output>/README.md: title, "
                             "licence, plots, prices per LLM role")

    @field_validator("pipeline")
    @classmethod
    def _known_stages(cls, names: list[str]) -> list[str]:
        from gmner_pipeline.stages import STAGES, is_known

        for name in names:
            if not is_known(name):
                raise ValueError(f"unknown stage {name!r}{_did_you_mean(name, STAGES)}; known: {sorted(STAGES)}")
        if len(set(names)) != len(names):
            raise ValueError(f"a stage appears twice in pipeline: {names}")
        return names

    @model_validator(mode="after")
    def _validate_stage_sections(self) -> "RunConfig":
        from gmner_pipeline.stages import STAGES, is_known, load_stage

        validated: dict[str, Any] = {}
        for name, section in self.stages.items():
            if not is_known(name):
                raise ValueError(f"stages.{name}: no such stage{_did_you_mean(name, STAGES)}; known: {sorted(STAGES)}")
            model = load_stage(name).Config
            if isinstance(section, StageConfig):
                validated[name] = section
                continue
            try:
                validated[name] = model.model_validate(section or {})
            except ValidationError as exc:  # keep the inner paths (stages.<name>.<key>) for the message
                raise SectionInvalid(("stages", name), model, exc) from None
        for name in self.pipeline:
            if name not in validated:
                validated[name] = load_stage(name).Config()
        self.stages = validated
        return self

    def stage_config(self, name: str) -> StageConfig:
        return self.stages[name]

    def to_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        data["stages"] = {k: v.model_dump(mode="json") for k, v in self.stages.items()}
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --- loading ---------------------------------------------------------------------------------------------------------

def _did_you_mean(name: str, choices: Any) -> str:
    return did_you_mean(name, list(choices))


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a","b","c"], value parsed as YAML, so 3 -> int, true -> bool, [a,b] -> list).
    A key holding dots (a plugin stage's name) goes in brackets: ``stages[my_pkg.stages:MyStage].batch_size=8``."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set run.shard_size=128")
    key, raw = item.split("=", 1)
    path = [a or b for a, b in re.findall(r"\[([^\]]+)\]|([^.\[\]]+)", key.strip())]
    if not path:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
    return data


def bundled_config_path(name: str) -> Path:
    """A config shipped in configs/ (works from a checkout and from an installed package)."""
    import gmner_pipeline.configs as pkg

    stem = name[:-5] if name.endswith(".yaml") else name
    path = Path(pkg.__file__).resolve().parent / f"{stem}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"no bundled config {name!r}; bundled: {known}")
    return path


def resolve_config_path(spec: str | None) -> Path | None:
    if spec is None:
        return None
    path = Path(spec)
    if path.is_file():
        return path
    if "/" not in spec and not spec.endswith((".yml",)):
        return bundled_config_path(spec)
    raise ConfigError(f"config file {spec!r} not found")


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(value: Any) -> Any:
    """``${VAR}`` / ``${VAR:-default}`` in string values of a YAML config, so paths can be parameters."""
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            if m.group(1) in os.environ:
                return os.environ[m.group(1)]
            if m.group(2) is not None:
                return m.group(2)
            raise ConfigError(f"config refers to ${{{m.group(1)}}}, which is not set; export it or use --set")
        return _ENV_REF.sub(sub, value)
    if isinstance(value, dict):
        return {k: expand_env(v) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v) for v in value]
    return value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (a path, or the name of a bundled one; None = built-in defaults) and apply overrides."""
    data: dict[str, Any] = {}
    resolved = resolve_config_path(str(path)) if path is not None else None
    if resolved is not None:
        try:
            data = yaml.safe_load(resolved.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{resolved}: not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{resolved}: the top level must be a mapping")
    data = apply_overrides(expand_env(data), overrides or [])
    try:
        return RunConfig.model_validate(data)
    except (ValidationError, SectionInvalid) as exc:
        raise ConfigError(_explain(exc, resolved, RunConfig, overrides)) from None


def _explain(exc: ValidationError | SectionInvalid, path: Path | None, model: type | None = None,
             overrides: list[str] | None = None) -> str:
    """The message of a config error: each problem with the path the user wrote, the file or ``--set`` it came
    from, and a did-you-mean for unknown keys (``config_errors``)."""
    sets = [(item, parse_override(item)[0]) for item in overrides or []]
    return explain(exc, model or RunConfig, path, sets)
