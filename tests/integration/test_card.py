"""The dataset card of a real run: written by every run, byte-identical for the same run in another folder, and
``datasets.load_dataset(<output>)`` returns the published splits directly (an empty split left out)."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from gmner_pipeline import runner
from gmner_pipeline.cli import app
from gmner_pipeline.config import load_config

pytestmark = pytest.mark.integration


def _run(out, *sets):
    result = runner.run(load_config("sample", [f"run.output_dir={out}", "run.progress=false", *sets]))
    assert result.ok
    return out


def _load(out, cache):
    import datasets

    return datasets.load_dataset(str(out), cache_dir=str(cache))


def test_card_is_written_identical_in_two_folders_and_loads_the_splits(tmp_path, ray_local, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    a, b = _run(tmp_path / "a"), _run(tmp_path / "elsewhere" / "b")
    card_a, card_b = (a / "README.md").read_bytes(), (b / "README.md").read_bytes()
    assert card_a == card_b
    plots = sorted(p.name for p in (a / "card").glob("*.png"))
    assert {"entity_types.png", "boxes_per_entity.png", "chain_consistency.png"} <= set(plots)
    assert "rewards.png" not in plots and "detector_labels.png" not in plots  # no grpo, no detections: not drawn
    for name in plots:
        assert (a / "card" / name).read_bytes() == (b / "card" / name).read_bytes(), name
    text = card_a.decode()
    assert str(tmp_path) not in text and "/tmp" not in text and not re.search(r"\d{8}-\d{6}", text)  # no run ids
    for name in plots:
        assert f"](card/{name})" in text  # linked from the card
    assert "split: D1" in text and "split: D2_filtered" not in text  # no stage wrote grpo: no such split

    ds = _load(a, tmp_path / "hf")
    assert set(ds) == {"D1", "D2"}
    assert ds["D1"].num_rows + ds["D2"].num_rows == 10
    assert all(s == "train" for s in ds["D1"]["split"])
    assert "| D1 | %d |" % ds["D1"].num_rows in text

    # everything in D1: the D2 folder is gone, and the card no longer names it
    _run(a, "dataset.d1_fraction=1.0")
    ds = _load(a, tmp_path / "hf2")
    assert set(ds) == {"D1"} and ds["D1"].num_rows == 10
    assert "split: D2" not in (a / "README.md").read_text()

    # the command writes the same card again (here: with a price for a role, which adds nothing without LLM tokens)
    before = (a / "README.md").read_bytes()
    (a / "README.md").unlink()
    res = CliRunner().invoke(app, ["card", str(a)])
    assert res.exit_code == 0, res.output
    assert (a / "README.md").read_bytes() == before


def test_a_run_without_cot_points_the_card_at_its_last_stage(tmp_path, ray_local, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = _run(tmp_path / "p", "pipeline=[passthrough]")
    text = (out / "README.md").read_text()
    assert "split: records" in text and "passthrough/" in text
    ds = _load(out, tmp_path / "hf")
    assert set(ds) == {"records"} and ds["records"].num_rows == 10
