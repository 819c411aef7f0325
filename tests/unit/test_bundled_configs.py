"""Every config that ships in configs/ loads and plans (the ones that need environment variables get placeholders),
and the real whole-graph config the README points at runs the same stages as the default, against served models."""

from __future__ import annotations

from pathlib import Path

import pytest

from gmner_pipeline.config import load_config
from gmner_pipeline.llm.config import LLMConfigError
from gmner_pipeline.plan import plan_run, stages_for_command

CONFIGS = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
PLACEHOLDERS = {"RTMDET_ONNX": "/nonexistent/model.onnx", "POLICY_URL": "http://policy:8000/v1",
                **{f"{k}_URL": f"http://{k.lower()}:8000/v1" for k in ("GEN1", "GEN2", "GEN3", "TEXT", "VL",
                                                                       "TEACHER", "VLM_TEACHER")},
                **{f"{k}_MODEL": f"model-{k.lower()}" for k in ("GEN1", "GEN2", "GEN3", "TEXT", "VL", "TEACHER",
                                                                "VLM_TEACHER")}}


@pytest.fixture
def env(tmp_path, monkeypatch):
    for key, value in PLACEHOLDERS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("GMNER_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("GMNER_IMAGES", str(tmp_path / "images"))
    return tmp_path


@pytest.mark.parametrize("name", CONFIGS)
def test_every_bundled_config_loads(name, env):
    config = load_config(name, [f"run.output_dir={env / 'out'}"])
    assert config.pipeline


def test_the_real_whole_graph_config_matches_the_default_graph_with_served_models(env):
    default = load_config("sample", [f"run.output_dir={env / 's'}"])
    full = load_config("twitter_gmner_full", [f"run.output_dir={env / 'out'}"])
    assert full.pipeline == default.pipeline == ["annotate", "knowledge", "distill", "grpo_filter"]
    assert full.stages["annotate"].detector.backend == "mmdet"  # COCO RTMDet, not the packaged person model
    assert len({full.llm.roles[r].endpoints[0].model for r in full.stages["knowledge"].generators}) == 3
    assert all(full.llm.roles[r].endpoints for r in ("knowledge_voter", "knowledge_summary", "teacher",
                                                     "vlm_teacher", "policy"))
    # up to distill it plans without a policy; the whole graph asks for the SFT adapter first, saying how
    assert [s.name for s in plan_run(full, stages_for_command(full, "distill")).stages] == full.pipeline[:3]
    with pytest.raises(LLMConfigError, match="train it first"):
        plan_run(full)
