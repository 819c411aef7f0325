"""The bundled twitter_gmner config on the real v2.0 train annotations: all 7,000 tweets get template-CoT shards, and
a second run recomputes nothing."""

from __future__ import annotations

import pytest

from conftest import GMNER_V2, needs_shared
from gmner_pipeline import runner
from gmner_pipeline.config import load_config
from gmner_pipeline.shards import SHARD_GLOB, read_records

pytestmark = [pytest.mark.integration, pytest.mark.shared_data, needs_shared(GMNER_V2)]


def test_twitter_gmner_train_to_template_cot(tmp_path, ray_local):
    overrides = [f"source.path={GMNER_V2}", f"run.output_dir={tmp_path / 'out'}", "run.progress=false"]
    result = runner.run(load_config("twitter_gmner", overrides))
    assert result.ok
    stage = result.plan.stages[-1]
    ids, consistent, chains = set(), 0, 0
    for path in stage.dir.glob(SHARD_GLOB):
        for rec in read_records(path, columns=["id", "cot"]):
            ids.add(rec["id"])
            chains += len(rec["cot"]["chains"])
            consistent += sum(ch["consistent"] for ch in rec["cot"]["chains"])
    assert len(ids) == 7000
    assert chains == consistent == 14000
    again = runner.run(load_config("twitter_gmner", overrides))
    assert again.ok and again.stages["template_cot"].processed_now == 0
