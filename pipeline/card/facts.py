"""What the dataset card says, gathered from an output folder as plain data.

Everything here is a pure function of the folder's committed files, and nothing in it depends on where or when the
run happened: no absolute paths (stage folders are found under the output folder by stage and key, so a moved folder
works), no run ids, no wall-clock seconds, every mapping sorted. Two runs of the same config in two folders (or on
two machines) give the same facts, so the card built from them is the same text.

Stages that are still being built elsewhere add fields to the record schema (knowledge 1.1: per-call tokens with the
role and the vote's support; distill 1.1: per-chain tokens and the teacher's model id; grpo_filter: the group
statistics). Every field is read with ``.get``: present, it adds a row or a plot; absent, it adds nothing.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable

import pyarrow.parquet as pq
import yaml

from ..publish import DATASET_DIR, SELECTORS, SPLIT_NAMES
from ..latest import load_latest, require_stage_dirs
from ..shards import MANIFEST, iter_committed_records, read_json
from ..summary import stage_totals
from .config import CardConfig

log = logging.getLogger(__name__)

COLUMNS = ["id", "split", "status", "grounding_labels", "entities", "detections", "knowledge", "cot", "grpo",
           "lineage"]
TEMPLATE_TEACHER = "template"  # the teacher of chains without a model (template styles)
FILTER_STATS = ("mean", "std", "max", "median")
FILTER_BOUNDS = ("min_std", "min_max", "median_low", "median_high")
GRPO_REPORT = "reports/grpo_filter.json"  # stages/grpo_filter/report.py writes it (with grpo_filter.png beside it)


def portable(text: Any) -> Any:
    """A model id or setting without the machine's folders: an absolute path keeps its last component only
    (``local:/home/me/models/qwen@ab12`` -> ``local:qwen@ab12``)."""
    if not isinstance(text, str) or "/" not in text:
        return text
    prefix, sep, rest = text.partition(":") if text.startswith("local:") else ("", "", text)
    head = rest.split("@")[0].split("+")[0]
    if head.startswith(("/", "~")) or (len(head) > 2 and head[1:3] == ":\\"):
        rest = rest.replace(head, Path(head).name, 1)
    return f"{prefix}{sep}{rest}"


def _sorted(d: dict[str, Any]) -> dict[str, Any]:
    return {k: d[k] for k in sorted(d)}


def _count_rows(folder: Path) -> int:
    return sum(pq.read_metadata(p).num_rows for p in sorted(folder.glob("*.parquet")))


def dataset_splits(output_dir: Path) -> dict[str, int]:
    """Records per published split that has files (an empty split has no folder and is left out)."""
    root = output_dir / DATASET_DIR
    out = {}
    for name in SPLIT_NAMES:
        folder = root / name
        if folder.is_dir() and any(folder.glob("*.parquet")):
            out[name] = _count_rows(folder)
    return out


def stage_dir(output_dir: Path, entry: dict[str, Any]) -> Path:
    return output_dir / entry["stage"] / entry["key"]


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    try:
        return read_json(path) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def stage_roles(name: str, manifest: dict[str, Any], raw_config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The LLM roles a stage called, with their model identity and sampling: from the stage manifest (``llm``, when
    the planner records it), else recomputed from the resolved config; {} when neither can say."""
    recorded = (manifest.get("llm") or {}).get("roles")
    if recorded:
        return {r: v for r, v in recorded.items()}
    try:
        from ..config import RunConfig
        from ..plan import llm_key_payload
        from ..stages import load_stage

        config = RunConfig.model_validate(raw_config)
        cls = load_stage(name)
        roles = cls.llm_roles(config.stages.get(name) or cls.Config())
        if not roles:
            return {}
        return dict((llm_key_payload(config, roles) or {}).get("roles") or {})
    except Exception as exc:  # noqa: BLE001 - the card says less, the run stands
        log.debug("card: roles of %s not recomputed: %s", name, exc)
        return {}


def own_sampling(config: Any) -> dict[str, Any] | None:
    """The sampling of a stage that sets it itself instead of taking its role's (grpo_filter: G samples at its own
    temperature, top-k, top-p and length), else None."""
    if not isinstance(config, dict) or "samples" not in config or "temperature" not in config:
        return None
    return {"n": config["samples"], **{k: config.get(k) for k in ("temperature", "top_p", "top_k", "max_tokens")}}


REPORT_KEYS = ("items", "kept", "dropped_by_first_rule", "failing_each_rule", "rules", "incomplete_groups",
               "not_sampled", "responses", "responses_zeroed", "responses_zero_reward")


def grpo_report(output_dir: Path) -> dict[str, Any] | None:
    """What the card shows of ``reports/grpo_filter.json`` (the filter report grpo_filter writes), when present."""
    path = output_dir / GRPO_REPORT
    try:
        report = read_json(path) if path.is_file() else None
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict):
        return None
    return {k: report[k] for k in REPORT_KEYS if k in report}


class Tally:
    """One pass over the final stage's records: what the plots and tables count."""

    def __init__(self) -> None:
        self.split_status: Counter[tuple[str, str]] = Counter()
        self.in_dataset: Counter[str] = Counter()
        self.types: Counter[str] = Counter()
        self.fine_types: Counter[str] = Counter()
        self.boxes_per_entity: Counter[int] = Counter()
        self.grounded_entities = 0
        self.visible_entities = 0
        self.detector_labels: Counter[str] = Counter()
        self.records_with_detections = 0
        self.chains: Counter[tuple[str, str]] = Counter()
        self.consistent: Counter[tuple[str, str]] = Counter()
        self.rejections: Counter[tuple[str, str, str]] = Counter()
        self.heldout_chains = 0
        self.rewards: list[float] = []
        self.group_stats: dict[str, list[float]] = {s: [] for s in FILTER_STATS}
        self.kept_stats: dict[str, list[float]] = {s: [] for s in FILTER_STATS}
        self.group_keep: Counter[str] = Counter()
        self.knowledge_status: Counter[str] = Counter()
        self.knowledge_calls: dict[str, list[dict[str, Any]]] = {}
        self.stage_tokens: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        self.stage_models: dict[str, set[str]] = defaultdict(set)
        self.stage_prompts: dict[str, set[str]] = defaultdict(set)
        self.lineage_calls: list[tuple[str, tuple[str, ...], int, int]] = []
        self.chain_calls: list[tuple[str, int, int]] = []
        self.population = 0

    def add(self, rec: dict[str, Any], with_dataset: bool) -> None:
        self.split_status[(rec.get("split") or "-", rec.get("status") or "-")] += 1
        member = [name for name, select in SELECTORS.items() if select(rec)] if with_dataset else []
        for name in member:
            self.in_dataset[name] += 1
        in_population = bool({"D1", "D2"} & set(member)) if with_dataset else rec.get("status") == "ok"
        if in_population:
            self._sample(rec)
        for ch in (rec.get("cot") or {}).get("chains") or []:
            self._chain(ch)
        grpo = rec.get("grpo")
        if grpo and rec.get("status") == "ok":
            self.rewards += [float(r) for r in grpo.get("rewards") or [] if r is not None]
            for s in FILTER_STATS:
                if grpo.get(s) is not None:
                    self.group_stats[s].append(float(grpo[s]))
                    if grpo.get("keep"):
                        self.kept_stats[s].append(float(grpo[s]))
            self.group_keep["kept" if grpo.get("keep") else (grpo.get("reason") or "dropped")] += 1
        for item in rec.get("knowledge") or []:
            self.knowledge_status[item.get("status") or "ok"] += 1
            if item.get("tokens") and item.get("cache_key"):  # one entry per key: the table computed it once
                self.knowledge_calls.setdefault(item["cache_key"], item["tokens"])
        for entry in rec.get("lineage") or []:
            stage = entry.get("stage") or "?"
            p, c = int(entry.get("prompt_tokens") or 0), int(entry.get("completion_tokens") or 0)
            self.stage_tokens[stage][0] += p
            self.stage_tokens[stage][1] += c
            models = tuple(sorted(portable(m) for m in entry.get("model_ids") or []))
            self.stage_models[stage].update(models)
            if entry.get("prompt_hash"):
                self.stage_prompts[stage].add(entry["prompt_hash"])
            if p or c:
                self.lineage_calls.append((stage, models, p, c))

    def _sample(self, rec: dict[str, Any]) -> None:
        self.population += 1
        grounded = rec.get("grounding_labels") == "present"
        for ent in rec.get("entities") or []:
            self.types[ent.get("type") or "-"] += 1
            if ent.get("fine_type"):
                self.fine_types[ent["fine_type"]] += 1
            if grounded:
                n = len(ent.get("boxes") or [])
                self.boxes_per_entity[min(n, 3)] += 1
                self.grounded_entities += 1
                self.visible_entities += n > 0
        det = rec.get("detections")
        if det and det.get("boxes"):  # the detector ran on every record; count those where it found something
            self.records_with_detections += 1
            for d in det.get("boxes") or []:
                self.detector_labels[d.get("label") or "-"] += 1

    def _chain(self, ch: dict[str, Any]) -> None:
        if ch.get("heldout"):
            self.heldout_chains += 1
        key = (ch.get("style") or "-", portable(ch.get("model_id")) or TEMPLATE_TEACHER)
        self.chains[key] += 1
        if ch.get("consistent"):
            self.consistent[key] += 1
        elif ch.get("rejection"):  # "code: detail for humans" (distill): counted by its code
            self.rejections[(*key, ch["rejection"].split(":", 1)[0].strip())] += 1
        if ch.get("prompt_tokens") is not None or ch.get("completion_tokens") is not None:
            self.chain_calls.append((key[1], int(ch.get("prompt_tokens") or 0), int(ch.get("completion_tokens") or 0)))


def writes_chains(stage: str) -> bool:
    """Whether ``stage`` writes the ``cot`` column: only its tokens are the chains' own (a later stage may call the
    same model, e.g. the embedded server as teacher and as policy)."""
    try:
        from ..stages import load_stage

        return "cot" in load_stage(stage).writes
    except Exception:  # noqa: BLE001 - a stage this installation does not know: judge by the name
        return stage in ("distill", "template_cot")


def role_tokens(stages: list[dict[str, Any]], tally: Tally) -> list[dict[str, Any]]:
    """Tokens per (stage, role), from the finest record each stage leaves: the knowledge stage's per-call tokens
    (once per entity key), the chains' own tokens (by the teacher's model id), else the lineage entries (a stage with
    one role: all of it; else by the entry's one model id). What cannot be put on one role is a row with role null."""
    rows: dict[tuple[str, str | None], list[int]] = defaultdict(lambda: [0, 0])
    for st in stages:
        roles = st["roles"]
        if not roles:
            continue
        by_model = defaultdict(list)
        for role, info in roles.items():
            by_model[portable(info.get("model"))].append(role)
        name = st["stage"]
        if name == "knowledge" and tally.knowledge_calls:
            for calls in tally.knowledge_calls.values():
                for call in calls:
                    row = rows[(name, call.get("role") if call.get("role") in roles else None)]
                    row[0] += int(call.get("prompt_tokens") or 0)
                    row[1] += int(call.get("completion_tokens") or 0)
            continue
        chain_models = {m for m, _, _ in tally.chain_calls}
        if tally.chain_calls and writes_chains(name) and chain_models & set(by_model):
            for model, p, c in tally.chain_calls:
                owners = by_model.get(model) or []
                if owners:
                    row = rows[(name, owners[0] if len(owners) == 1 else None)]
                    row[0] += p
                    row[1] += c
            continue
        for stage, models, p, c in tally.lineage_calls:
            if stage != name:
                continue
            if len(roles) == 1:
                role: str | None = next(iter(roles))
            else:
                owners = by_model.get(models[0], []) if len(models) == 1 else []
                role = owners[0] if len(owners) == 1 else None
            rows[(name, role)][0] += p
            rows[(name, role)][1] += c
    return [{"stage": s, "role": r, "model": _model_of(stages, s, r), "prompt_tokens": v[0], "completion_tokens": v[1]}
            for (s, r), v in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1] or "~"))]


def _model_of(stages: list[dict[str, Any]], stage: str, role: str | None) -> str | None:
    for st in stages:
        if st["stage"] == stage and role in st["roles"]:
            return portable(st["roles"][role].get("model"))
    return None


def costs(rows: list[dict[str, Any]], card: CardConfig) -> dict[str, Any] | None:
    """The cost of each (stage, role) row with a price, and the total; None when no role has a price."""
    if not card.prices:
        return None
    items, total, unpriced = [], 0.0, 0
    for row in rows:
        price = card.prices.get(row["role"] or "")
        if price is None:
            unpriced += row["prompt_tokens"] + row["completion_tokens"]
            continue
        cost = row["prompt_tokens"] / 1e6 * price.input_per_1m + row["completion_tokens"] / 1e6 * price.output_per_1m
        items.append({"stage": row["stage"], "role": row["role"], "cost": round(cost, 6)})
        total += cost
    return {"currency": card.currency, "items": items, "total": round(total, 6), "unpriced_tokens": unpriced}


def filter_thresholds(config: Any) -> dict[str, float]:
    """The grpo_filter bounds, wherever its config keeps them (top level or a nested section)."""
    found: dict[str, float] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k in FILTER_BOUNDS and isinstance(v, (int, float)):
                    found.setdefault(k, float(v))
                else:
                    walk(v)

    walk(config)
    return found


def collect(output_dir: str | Path) -> dict[str, Any]:
    """Every fact the card and its plots show, for the last run in ``output_dir``."""
    out = Path(output_dir)
    latest = load_latest(out)
    require_stage_dirs(out, latest)
    cfg_path = out / "config.yaml"
    raw_config = (yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}) if cfg_path.is_file() else {}
    card = CardConfig.model_validate(raw_config.get("card") or {})
    chain = latest["chain"]
    splits = dataset_splits(out)
    stages = []
    for entry in chain:
        folder = stage_dir(out, entry)
        manifest = read_manifest(folder)
        totals = stage_totals(folder)
        stages.append({
            "stage": entry["stage"],
            "version": entry.get("version") or manifest.get("version"),
            "records_in": totals["records_in"], "records_ok": totals["records_ok"],
            "records_dropped": totals["records_dropped"], "records_error": totals["records_error"],
            "drop_reasons": _sorted(totals["drop_reasons"]), "errors_by_stage": _sorted(totals["errors_by_stage"]),
            "counters": _sorted(totals["counters"]),
            "config": _portable_tree(manifest.get("config") if entry["stage"] != "ingest" else manifest.get("source")),
            "roles": _roles(entry["stage"], manifest, raw_config),
        })
    ingest_totals = stages[0]
    if chain[0]["stage"] == "ingest":
        ingest_totals["records_in"] = latest.get("ingest", {}).get("records_in", ingest_totals["records_in"])
    tally = Tally()
    final = stage_dir(out, chain[-1])
    with_dataset = (out / DATASET_DIR).is_dir()
    for rec in iter_committed_records(final, COLUMNS):
        tally.add(rec, with_dataset)
    for st in stages:
        st["prompt_hashes"] = sorted(tally.stage_prompts.get(st["stage"], ()))
        st["models"] = sorted(tally.stage_models.get(st["stage"], ()))
        p, c = tally.stage_tokens.get(st["stage"], [0, 0])
        st["prompt_tokens"], st["completion_tokens"] = p, c
    tokens_by_role = role_tokens(stages, tally)
    grpo_stage = next((s for s in stages if s["stage"] == "grpo_filter"), None)
    return {
        "title": card.title or f"{_source_name(raw_config)}: GMNER data from gmner-pipeline",
        "license": card.license,
        "source": _portable_tree(_source_facts(raw_config)),
        "source_records": _nested(tally.split_status),
        "splits": splits,
        "final_stage": chain[-1]["stage"],
        "final_stage_path": f"{chain[-1]['stage']}/{chain[-1]['key']}",
        "stages": stages,
        "dataset_config": raw_config.get("dataset") or {},
        "population": tally.population,
        "population_is_dataset": with_dataset,
        "entity_types": _sorted(dict(tally.types)),
        "fine_types": _sorted(dict(tally.fine_types)),
        "boxes_per_entity": {("3+" if k == 3 else str(k)): v for k, v in sorted(tally.boxes_per_entity.items())},
        "grounded_entities": tally.grounded_entities,
        "visible_entities": tally.visible_entities,
        "detector_labels": dict(sorted(tally.detector_labels.items(), key=lambda kv: (-kv[1], kv[0]))),
        "records_with_detections": tally.records_with_detections,
        "chains": [{"style": s, "teacher": t, "chains": n, "consistent": tally.consistent[(s, t)]}
                   for (s, t), n in sorted(tally.chains.items())],
        "rejections": [{"style": s, "teacher": t, "reason": r, "chains": n}
                       for (s, t, r), n in sorted(tally.rejections.items())],
        "heldout_chains": tally.heldout_chains,
        "rewards": sorted(tally.rewards),
        "group_stats": {k: sorted(v) for k, v in tally.group_stats.items() if v},
        "kept_stats": {k: sorted(v) for k, v in tally.kept_stats.items() if v},
        "grpo_report": grpo_report(out),
        "group_outcomes": _sorted(dict(tally.group_keep)),
        "filter_thresholds": filter_thresholds(grpo_stage["config"]) if grpo_stage else {},
        "knowledge_status": _sorted(dict(tally.knowledge_status)),
        "knowledge_keys": len(tally.knowledge_calls),
        "tokens_by_role": tokens_by_role,
        "cost": costs(tokens_by_role, card),
        "plots": card.plots,
    }


def _roles(stage: str, manifest: dict[str, Any], raw_config: dict[str, Any]) -> dict[str, Any]:
    roles = {r: _portable_tree(v) for r, v in sorted(stage_roles(stage, manifest, raw_config).items())}
    own = own_sampling(manifest.get("config"))
    if own is not None:  # the role's own sampling is not what this stage asked for
        roles = {r: {**v, "sampling": own} for r, v in roles.items()}
    return roles


def _nested(counter: Counter[tuple[str, str]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for (split, status), n in sorted(counter.items()):
        out.setdefault(split, {})[status] = n
    return out


def _source_name(raw_config: dict[str, Any]) -> str:
    src = raw_config.get("source") or {}
    return str(src.get("name") or src.get("kind") or "gmner")


def _source_facts(raw_config: dict[str, Any]) -> dict[str, Any]:
    """The source's settings without its paths (where the files lie differs between machines)."""
    src = dict(raw_config.get("source") or {})
    for key in ("path", "image_dir"):
        if src.get(key):
            src[key] = Path(str(src[key])).name
    return _sorted(src)


def _portable_tree(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _portable_tree(v) for k, v in sorted(node.items())}
    if isinstance(node, list):
        return [_portable_tree(v) for v in node]
    return portable(node)


def iter_split_names(facts: dict[str, Any]) -> Iterable[str]:
    return (name for name in SPLIT_NAMES if facts["splits"].get(name))
