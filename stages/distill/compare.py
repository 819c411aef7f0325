"""``gmner-pipeline teachers <output>``: the teacher versions present in an output folder, side by side.

Every ``distill/<key>/`` folder of an output folder (one per combination of teachers and settings; a new teacher
writes a new folder and leaves the old one) is read from its manifest (``_stage.json``: the models and sampling per
role), its commit markers (shards, seconds) and its committed shards (the chains). A **teacher version** is a style,
a model id and a style key (``COT_CHAIN.style_key``: the style's settings, prompts, sampling and frame): the same
version found in several folders (a style reused while another style's teacher changed) is counted once per record.

Per version: records, chains, chains per record, consistent chains and the consistency rate, records with at least
one consistent chain, rejection reasons, attempts, tokens and request seconds. Per pair of versions: the records both
were asked about, and the share of them on which both produced a consistent chain. Pure functions over the folder;
the command prints them with rich (or as JSON with ``--json``).
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gmner_pipeline.shards import MANIFEST, iter_committed_records, read_json, read_markers
from gmner_pipeline.storage import location


@dataclass
class FolderInfo:
    stage: str
    key: str
    dir: str
    shards: int
    records: int
    seconds: float  # summed shard wall time of the commit markers
    runs: list[str]
    teachers: dict[str, str]  # role -> model identity (manifest)


@dataclass
class Version:
    """One teacher version's chains, deduplicated by record across folders."""

    style: str
    model_id: str | None
    style_key: str | None
    folders: list[str] = field(default_factory=list)
    records: set[str] = field(default_factory=set)
    consistent_records: set[str] = field(default_factory=set)
    chains: int = 0
    consistent: int = 0
    attempts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    rejections: Counter[str] = field(default_factory=Counter)
    frames: set[str] = field(default_factory=set)

    @property
    def label(self) -> str:
        who = self.model_id or "template"
        return f"{self.style}:{who}@{(self.style_key or '-')[:8]}"

    def summary(self) -> dict[str, Any]:
        chains = max(self.chains, 1)
        return {
            "version": self.label, "style": self.style, "model_id": self.model_id, "style_key": self.style_key,
            "folders": self.folders, "records": len(self.records), "chains": self.chains,
            "chains_per_record": round(self.chains / max(len(self.records), 1), 3),
            "consistent_chains": self.consistent, "consistency_rate": round(self.consistent / chains, 4),
            "records_with_consistent_chain": len(self.consistent_records),
            "rejections": dict(self.rejections.most_common()), "attempts_per_chain": round(self.attempts / chains, 3),
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "tokens_per_chain": round((self.prompt_tokens + self.completion_tokens) / chains, 1),
            "request_seconds": round(self.seconds, 3), "frames": sorted(self.frames),
        }


@dataclass
class Comparison:
    folders: list[FolderInfo]
    versions: list[Version]
    pairs: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {"folders": [f.__dict__ for f in self.folders], "versions": [v.summary() for v in self.versions],
                "pairs": self.pairs}


def stage_folders(output_dir: str | Path, stage: str = "distill") -> list[Path]:
    """The ``<output>/<stage>/<key>/`` folders holding a manifest, oldest first."""
    root = location(output_dir) / stage
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: ((p / MANIFEST).stat().st_mtime, p.name))


def compare_teachers(output_dir: str | Path, stage: str = "distill") -> Comparison:
    folders: list[FolderInfo] = []
    versions: dict[tuple[str, str | None, str | None], Version] = {}
    for folder in stage_folders(output_dir, stage):
        manifest = read_json(folder / MANIFEST)
        markers = read_markers(folder)
        roles = ((manifest.get("llm") or {}).get("roles") or {})
        info = FolderInfo(stage, manifest.get("key", folder.name), str(folder), len(markers),
                          sum(m.get("records_in", 0) for m in markers.values()),
                          round(sum(m.get("seconds", 0.0) or 0.0 for m in markers.values()), 3),
                          sorted({m.get("run_id") for m in markers.values() if m.get("run_id")}),
                          {role: spec.get("model") for role, spec in roles.items()})
        folders.append(info)
        seen_here: set[tuple[Any, str]] = set()
        for rec in iter_committed_records(folder, columns=["id", "status", "cot"]):
            for chain in (rec.get("cot") or {}).get("chains") or []:
                vkey = (chain.get("style"), chain.get("model_id"), chain.get("style_key"))
                version = versions.get(vkey)
                if version is None:
                    version = versions[vkey] = Version(*vkey)
                if info.key not in version.folders:
                    version.folders.append(info.key)
                if rec["id"] in version.records and (vkey, rec["id"]) not in seen_here:
                    continue  # this version's chains of this record were counted from an earlier folder
                seen_here.add((vkey, rec["id"]))
                add_chain(version, rec["id"], chain)
    ordered = sorted(versions.values(), key=lambda v: (v.style, v.model_id or "", v.style_key or ""))
    return Comparison(folders, ordered, pair_overlaps(ordered))


def add_chain(version: Version, record_id: str, chain: dict[str, Any]) -> None:
    version.records.add(record_id)
    version.chains += 1
    version.attempts += chain.get("attempts") or 1
    version.prompt_tokens += chain.get("prompt_tokens") or 0
    version.completion_tokens += chain.get("completion_tokens") or 0
    version.seconds += chain.get("seconds") or 0.0
    if chain.get("frame"):
        version.frames.add(chain["frame"])
    if chain.get("consistent"):
        version.consistent += 1
        version.consistent_records.add(record_id)
    else:
        version.rejections[(chain.get("rejection") or "unknown").split(":")[0]] += 1


def pair_overlaps(versions: list[Version]) -> list[dict[str, Any]]:
    """For every pair of versions: records both were asked about, and on how many both wrote a consistent chain."""
    out = []
    for a, b in itertools.combinations(versions, 2):
        common = a.records & b.records
        if not common:
            continue
        both = a.consistent_records & b.consistent_records
        out.append({"a": a.label, "b": b.label, "records_both_asked": len(common), "both_consistent": len(both),
                    "share_both_consistent": round(len(both) / len(common), 4),
                    "only_a": len((a.consistent_records - b.consistent_records) & common),
                    "only_b": len((b.consistent_records - a.consistent_records) & common)})
    return out


def render(comparison: Comparison) -> Any:
    """Rich tables: folders, versions side by side, pairs."""
    from rich.console import Group
    from rich.table import Table

    folders = Table(title="stage folders (oldest first)", title_justify="left")
    for col in ("key", "shards", "records", "wall s", "runs", "teachers (role: model)"):
        folders.add_column(col, overflow="fold")
    for f in comparison.folders:
        folders.add_row(f.key[:10], str(f.shards), str(f.records), f"{f.seconds:.1f}", ", ".join(f.runs) or "-",
                        "; ".join(f"{r}: {m}" for r, m in f.teachers.items()) or "-")
    versions = Table(title="teacher versions", title_justify="left")
    cols = ("version", "folders", "records", "chains", "chains/rec", "consistent", "rate", "recs w/ consistent",
            "rejections", "attempts/chain", "tokens (prompt+compl.)", "tokens/chain", "request s")
    for col in cols:
        versions.add_column(col, overflow="fold", justify="left" if col in ("version", "folders", "rejections")
                            else "right")
    for v in comparison.versions:
        s = v.summary()
        versions.add_row(s["version"], ", ".join(k[:10] for k in s["folders"]), str(s["records"]), str(s["chains"]),
                         f"{s['chains_per_record']:.2f}", str(s["consistent_chains"]),
                         f"{100 * s['consistency_rate']:.1f}%", str(s["records_with_consistent_chain"]),
                         ", ".join(f"{k}: {n}" for k, n in s["rejections"].items()) or "-",
                         f"{s['attempts_per_chain']:.2f}", f"{s['prompt_tokens']:,}+{s['completion_tokens']:,}",
                         f"{s['tokens_per_chain']:.0f}", f"{s['request_seconds']:.1f}")
    pairs = Table(title="pairs: records on which both versions wrote a consistent chain", title_justify="left")
    for col in ("a", "b", "both asked", "both consistent", "share", "only a", "only b"):
        pairs.add_column(col, overflow="fold")
    for p in comparison.pairs:
        pairs.add_row(p["a"], p["b"], str(p["records_both_asked"]), str(p["both_consistent"]),
                      f"{100 * p['share_both_consistent']:.1f}%", str(p["only_a"]), str(p["only_b"]))
    return Group(folders, versions, pairs)
