"""The dataset card's text: a Hugging Face card (YAML header, then Markdown) from the facts of ``facts.collect``.

The header's ``configs`` / ``data_files`` name the published split folders relative to the output folder, so
``datasets.load_dataset("<output>")`` returns D1, D2 and D2_filtered directly; a split without records has no folder
and is left out (``datasets`` refuses a pattern that matches nothing). A run that published no dataset (no CoT stage)
points the default config at the final stage's shards instead.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from ..publish import DATASET_DIR
from ..schema import SCHEMA_VERSION
from ..shards import SHARD_GLOB

SPLIT_ABOUT = {
    "D1": "SFT (MCR's MRSI): training records with at least one chain consistent with the gold annotation",
    "D2": "GRPO (MCR's CVO): the other training records with a consistent chain (D_R minus D1)",
    "D2_filtered": "the D2 records grpo_filter kept (reward statistics within the thresholds)",
}


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)
    return text.replace("|", "\\|").replace("\n", " ") or "-"


def _counts(d: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(d.items(), key=lambda kv: (-kv[1], kv[0]))) or "-"


def _pairs(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}: {_cell(v)}" for k, v in d.items()) or "-"


def _table(head: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def header(facts: dict[str, Any]) -> dict[str, Any]:
    """The card's YAML metadata."""
    files = [{"split": name, "path": f"{DATASET_DIR}/{name}/*.parquet"} for name in ("D1", "D2", "D2_filtered")
             if facts["splits"].get(name)]
    if not files and not facts["population_is_dataset"]:
        files = [{"split": "records", "path": f"{facts['final_stage_path']}/{SHARD_GLOB}"}]
    meta: dict[str, Any] = {"pretty_name": facts["title"]}
    if facts.get("license"):
        meta["license"] = facts["license"]
    meta["tags"] = ["gmner", "multimodal-ner", "visual-grounding", "chain-of-thought", "gmner-pipeline"]
    if files:
        meta["configs"] = [{"config_name": "default", "data_files": files}]
    return meta


def render_card(facts: dict[str, Any], plots: list[tuple[str, str]]) -> str:
    parts = ["---", yaml.safe_dump(header(facts), sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             f"# {facts['title']}", ""]
    parts += _intro(facts) + _source(facts) + _stages(facts) + _models(facts) + _tokens(facts)
    parts += _statistics(facts, plots) + _settings(facts) + _schema()
    return "\n".join(parts).rstrip() + "\n"


def _intro(facts: dict[str, Any]) -> list[str]:
    splits = facts["splits"]
    out = ["Grounded multimodal NER data (entity span, type, and box in the image or `None`) with reasoning chains, "
           "made by gmner-pipeline. This card describes the last run in "
           "this folder; `gmner-pipeline card <this folder>` writes it again.", ""]
    if splits:
        out += ["```python", "from datasets import load_dataset", "",
                f"ds = load_dataset(\"<this folder>\")  # splits: {', '.join(splits)}", "```", "",
                _table(["split", "records", "what"], [[n, splits[n], SPLIT_ABOUT[n]] for n in splits]), ""]
    elif facts["population_is_dataset"]:
        out += ["The run published no training records (no record of a training split has a chain consistent with "
                "its gold annotation), so `load_dataset` has no split to return.", ""]
    else:
        out += ["This run wrote no reasoning chains, so it published no D1 / D2; `load_dataset(\"<this folder>\")` "
                f"returns the records of its last stage (`{facts['final_stage']}`) as the split `records`.", ""]
    if facts["heldout_chains"]:
        out += [f"{facts['heldout_chains']} chains were written for dev/test records on request (held out): they "
                "are in the stage shards only, never in a split above.", ""]
    return out


def _source(facts: dict[str, Any]) -> list[str]:
    src = facts["source"]
    rows = [[split, sum(st.values()), st.get("ok", 0), st.get("dropped", 0), st.get("error", 0)]
            for split, st in facts["source_records"].items()]
    settings = ", ".join(f"`{k}`: {_cell(v)}" for k, v in src.items() if v not in (None, [], {}))
    return ["## Source", "", settings, "",
            "Records of the last stage by source split and status:", "",
            _table(["source split", "records", "ok", "dropped", "error"], rows), ""]


def _stages(facts: dict[str, Any]) -> list[str]:
    rows = [[s["stage"], s.get("version") or "-", s["records_in"], s["records_ok"], s["records_dropped"],
             s["records_error"], _counts(s["drop_reasons"]), _counts(s["errors_by_stage"]), _counts(s["counters"])]
            for s in facts["stages"]]
    return ["## How it was made", "",
            "Each stage read the records of the one before it; a record that a stage dropped or failed on keeps its "
            "status and reason in every later stage (nothing is lost).", "",
            _table(["stage", "version", "records in", "ok", "dropped", "errors", "drops by reason",
                    "errors by stage", "stage counters"], rows), ""]


def _models(facts: dict[str, Any]) -> list[str]:
    rows = []
    for s in facts["stages"]:
        for role, info in s["roles"].items():
            sampling = info.get("sampling") or {}
            shown = {k: sampling[k] for k in ("temperature", "top_p", "top_k", "max_tokens", "n") if
                     sampling.get(k) is not None}
            rows.append([s["stage"], role, info.get("model") or "-", _pairs(shown)])
    prompts = [[s["stage"], ", ".join(s["models"]) or "-", ", ".join(s["prompt_hashes"]) or "-"]
               for s in facts["stages"] if s["models"] or s["prompt_hashes"]]
    out = ["## Models and prompts", ""]
    if rows:
        out += ["LLM roles (model identity: name, `@revision` or the weights' content hash):", "",
                _table(["stage", "role", "model", "sampling"], rows), ""]
    if prompts:
        out += ["Models and prompt template hashes recorded in the records' lineage:", "",
                _table(["stage", "models", "prompt hashes"], prompts), ""]
    if not rows and not prompts:
        out += ["No stage of this run called a model.", ""]
    return out


def _tokens(facts: dict[str, Any]) -> list[str]:
    stages = [s for s in facts["stages"] if s["prompt_tokens"] or s["completion_tokens"]]
    if not stages:
        return []
    out = ["## Tokens and cost", "",
           _table(["stage", "prompt tokens", "completion tokens"],
                  [[s["stage"], s["prompt_tokens"], s["completion_tokens"]] for s in stages]), ""]
    roles = facts["tokens_by_role"]
    if roles:
        out += ["Per role (from the finest record each stage keeps: per call, per chain, else per record; a row "
                "without a role is what could not be put on one):", "",
                _table(["stage", "role", "model", "prompt tokens", "completion tokens"],
                       [[r["stage"], r["role"] or "(several)", r["model"] or "-", r["prompt_tokens"],
                         r["completion_tokens"]] for r in roles]), ""]
    cost = facts["cost"]
    if cost:
        out += [_table(["stage", "role", f"cost ({cost['currency']})"],
                       [[c["stage"], c["role"], f"{c['cost']:.4f}"] for c in cost["items"]]
                       + [["total", "", f"{cost['total']:.4f}"]]), ""]
        if cost["unpriced_tokens"]:
            out += [f"{cost['unpriced_tokens']} tokens belong to roles without a price (`card.prices`).", ""]
    else:
        out += ["Set `card.prices.<role>: {input_per_1m, output_per_1m}` in the config for a cost table.", ""]
    return out


def _statistics(facts: dict[str, Any], plots: list[tuple[str, str]]) -> list[str]:
    what = ("the records of D1 and D2" if facts["population_is_dataset"] else
            f"the records of `{facts['final_stage']}` with status ok")
    out = ["## Statistics", "", f"Over {what}: {facts['population']} records."]
    if facts["grounded_entities"]:
        share = facts["visible_entities"] / facts["grounded_entities"]
        out += [f"{facts['grounded_entities']} entities with grounding labels, {100 * share:.1f}% of them visible "
                "(at least one gold box)."]
    if facts["detector_labels"]:
        boxes = sum(facts["detector_labels"].values())
        out.append(f"Detector: {boxes} boxes on {facts['records_with_detections']} of {facts['population']} records "
                   f"({_counts(facts['detector_labels'])}).")
    out.append("")
    if facts["entity_types"]:
        out += [_table(["type", "entities"], [[k, v] for k, v in facts["entity_types"].items()]), ""]
    if facts["chains"]:
        rej: dict[tuple[str, str], dict[str, int]] = {}
        for r in facts["rejections"]:
            rej.setdefault((r["style"], r["teacher"]), {})[r["reason"]] = r["chains"]
        out += ["Chains by style and teacher (all records of the last stage, held-out ones included):", "",
                _table(["style", "teacher", "chains", "consistent", "share", "rejected by reason"],
                       [[c["style"], c["teacher"], c["chains"], c["consistent"],
                         f"{100 * c['consistent'] / c['chains']:.1f}%" if c["chains"] else "-",
                         _counts(rej.get((c["style"], c["teacher"]), {}))] for c in facts["chains"]]), ""]
    out += _grpo_filter(facts)
    if facts["knowledge_status"]:
        out += [f"Entity knowledge: {facts['knowledge_keys']} entity keys with per-call records; items by status: "
                f"{_counts(facts['knowledge_status'])}.", ""]
    for title, path in plots:
        out += [f"### {title}", "", f"![{title}]({path})", ""]
    return out


def _grpo_filter(facts: dict[str, Any]) -> list[str]:
    """The keep/drop decisions of grpo_filter: from its report (``reports/grpo_filter.json``) when the run wrote one,
    else from the records' ``grpo`` columns."""
    report, outcomes = facts.get("grpo_report"), facts["group_outcomes"]
    if not report and not outcomes:
        return []
    out = ["### GRPO filter", ""]
    bounds = _pairs(facts["filter_thresholds"]) if facts["filter_thresholds"] else "the defaults"
    if not report:
        return out + [f"Groups: {_counts(outcomes)}; thresholds {bounds}.", ""]
    items, kept = report.get("items", 0), report.get("kept", 0)
    share = f" ({100 * kept / items:.1f}%)" if items else ""
    out += [f"grpo_filter sampled the policy for every D2 record with a consistent chain and kept {kept} of {items} "
            f"complete groups{share} (thresholds: {bounds}). A group is removed by the first rule it fails:", ""]
    rules = report.get("rules") or {}
    first, each = report.get("dropped_by_first_rule") or {}, report.get("failing_each_rule") or {}
    out += [_table(["rule", "fails when", "removed (first failing rule)", "failing (any order)"],
                   [[r, rules.get(r, "-"), first.get(r, 0), each.get(r, 0)] for r in _rule_order(first)]), ""]
    notes = []
    if report.get("incomplete_groups"):
        notes.append(f"{report['incomplete_groups']} groups with a failed request (errors, not decisions)")
    if report.get("not_sampled"):
        notes.append(f"not sampled: {_counts(report['not_sampled'])}")
    if report.get("responses"):
        zeroed = report.get("responses_zeroed") or {}
        notes.append(f"{report['responses']} responses, {report.get('responses_zero_reward', 0)} with reward 0"
                     + (f" (zeroed by rule: {_counts(zeroed)})" if zeroed else ""))
    if notes:
        out += ["; ".join(notes).capitalize() + ".", ""]
    out += ["The full report (histograms of the group statistics, all and kept, with quartiles): "
            "[reports/grpo_filter.json](reports/grpo_filter.json), plotted in "
            "[reports/grpo_filter.png](reports/grpo_filter.png); `gmner-pipeline grpo-report` redraws it with other "
            "thresholds without sampling again.", ""]
    return out


RULE_ORDER = ("too_few_rewards", "low_std", "low_max", "median_below", "median_above")  # scoring.group_stats's order


def _rule_order(rules: dict[str, int]) -> list[str]:
    return [r for r in RULE_ORDER if r in rules] + sorted(r for r in rules if r not in RULE_ORDER)


def _settings(facts: dict[str, Any]) -> list[str]:
    out = ["## Settings", "", "The D1 / D2 split (`dataset:`): " + (_pairs(facts["dataset_config"]) if
                                                                   facts["dataset_config"] else "defaults") + ".", ""]
    for s in facts["stages"]:
        if s["config"]:
            out += [f"<details><summary><code>{s['stage']}</code> settings (thresholds, routes, templates)</summary>",
                    "", "```yaml", yaml.safe_dump(s["config"], sort_keys=True, allow_unicode=True).rstrip(), "```",
                    "", "</details>", ""]
    return out


def _schema() -> list[str]:
    return ["## Record schema", "",
            f"One row per record, record schema {SCHEMA_VERSION} (the project's `docs/schema.md`): `id`, `source`, "
            "`split`, `text`, `tokens`, `image` (path, size, sha256: images are referenced, not embedded; "
            "`gmner-pipeline export --format hf` writes them in), `entities` (span, type, fine type, gold boxes in "
            "original pixels), `detections`, `knowledge`, `cot` (chains with style, teacher, answer and whether "
            "it is consistent with gold; `split`), `grpo` (rewards and the filter decision), `status`, and "
            "`lineage` (per stage: version, models, prompt hash, tokens).", "",
            "Dev and test records never enter D1 or D2.", ""]
