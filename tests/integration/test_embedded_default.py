"""The embedded default end to end on a real local Ray instance: the bundled sample (photos from scikit-image and
matplotlib, no network) through template_cot; every chain round-trips; a rerun recomputes nothing."""

from __future__ import annotations

import pytest

runner = pytest.importorskip("gmner_pipeline.runner", reason="the runner lands with the foundation work on main")
from gmner_pipeline.answer import gold_triples, parse_answer, same_triples  # noqa: E402
from gmner_pipeline.config import load_config  # noqa: E402
from gmner_pipeline.shards import SHARD_GLOB, read_records  # noqa: E402

pytestmark = pytest.mark.integration


def test_sample_through_template_cot(tmp_path, ray_local):
    config = load_config("sample", [f"run.output_dir={tmp_path / 'out'}", "run.progress=false"])
    assert config.source.kind == "sample" and config.pipeline == ["template_cot"]
    result = runner.run(config)
    assert result.ok
    stage = result.plan.stages[-1]
    records = [r for path in sorted(stage.dir.glob(SHARD_GLOB)) for r in read_records(path)]
    assert len(records) == 10 and {r["status"] for r in records} == {"ok"}
    assert all(r["image"]["sha256"] for r in records)  # photos were materialised and read
    chains = [c for r in records for c in r["cot"]["chains"]]
    assert len(chains) == 20 and all(c["consistent"] for c in chains)
    for rec in records:
        for chain in rec["cot"]["chains"]:
            assert same_triples(parse_answer(chain["text"]).triples, gold_triples(rec))

    again = runner.run(config)
    assert again.ok and again.stages["template_cot"].processed_now == 0
