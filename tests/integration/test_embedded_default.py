"""The default run end to end, as a newcomer starts it: the bundled sample (real photos from scikit-image and
matplotlib, no network) through the whole data graph with the packaged detector and the embedded LLM server for every
role; then a rerun that recomputes nothing and so asks no model anything. Three records keep it under a minute; the
full sample is what CI's first command (`gmner-pipeline run synthesize`) runs."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from gmner_pipeline import runner
from gmner_pipeline.config import load_config
from gmner_pipeline.report import summary_table
from gmner_pipeline.shards import SHARD_GLOB, read_records

pytestmark = pytest.mark.integration

GRAPH = ["annotate", "knowledge", "distill", "grpo_filter"]


def test_the_default_run_covers_the_whole_graph_and_a_rerun_asks_no_model(tmp_path, ray_local):
    out = tmp_path / "out"
    config = load_config("sample", [f"run.output_dir={out}", "run.progress=false", "source.limit=3",
                                    "run.shard_size=2", f"llm.cache.path={tmp_path / 'llm-cache.sqlite'}"])
    assert config.source.kind == "sample" and config.pipeline == GRAPH
    result = runner.run(config)
    assert result.ok, result.failed
    assert [s.name for s in result.plan.stages] == GRAPH

    last = result.plan.stages[-1]
    records = [r for path in sorted(last.dir.glob(SHARD_GLOB)) for r in read_records(path)]
    assert len(records) == 3 and all(r["status"] in ("ok", "dropped") for r in records), \
        [(r["id"], r["status"], r["error"]) for r in records]
    astronaut = next(r for r in records if r["id"].endswith("/astronaut"))
    assert [b["label"] for b in astronaut["detections"]["boxes"]][:1] == ["person"]  # the packaged detector
    assert all(r["knowledge"] is not None for r in records)  # every entity was asked about (answers may be N/A)
    styles = {c["style"] for r in records for c in r["cot"]["chains"]}
    assert styles == {"template", "llm"}
    assert any(r.get("grpo") for r in records if r["cot"]["split"] == "D2") or \
        not any(r["cot"]["split"] == "D2" for r in records)
    assert (out / "dataset").is_dir() and (out / "reports" / "grpo_filter.json").is_file()

    # the end-of-run summary fits a CI log's 80 columns: nothing cut, reasons and counters on their own lines
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(summary_table(result))
    text = console.export_text()
    assert "…" not in text and all(f" {name} " in text for name in GRAPH[:-1]) and "grpo_filter " in text
    assert "distill: " in text and "template:consistent" in text

    cache = (tmp_path / "llm-cache.sqlite").stat().st_size
    again = runner.run(config)
    assert again.ok and {name: sp.processed_now for name, sp in again.stages.items()} == dict.fromkeys(GRAPH, 0)
    assert (tmp_path / "llm-cache.sqlite").stat().st_size == cache  # no request, not even a cached one, was made
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(summary_table(again))  # its calls column is the output's cost: the summary says none were made
    assert "every shard was reused, none computed" in " ".join(console.export_text().split())
    latest = json.loads((out / "latest.json").read_text())
    assert all(s["shards_processed_now"] == 0 for s in latest["stages"].values())
