"""The dataset card of a real run: written by every run, byte-identical for the same run in another folder, and
``datasets.load_dataset(<output>)`` returns the published splits directly (an empty split left out)."""

from __future__ import annotations

import re

import yaml

import pytest
from typer.testing import CliRunner

from gmner_pipeline import runner
from gmner_pipeline.cli import app
from gmner_pipeline.config import load_config

pytestmark = pytest.mark.integration


def _run(out, *sets):
    """The bundled sample through template chains only (no model: the same records on every run and machine)."""
    result = runner.run(load_config("sample", [f"run.output_dir={out}", "run.progress=false",
                                               "pipeline=[template_cot]", *sets]))
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


# --- the whole graph's card: distill with a scripted teacher, grpo_filter with a scripted policy ----------------------

THINK = "The sentence names a person and a city; the picture shows the person, not the city, so only one box."


def half_right_teacher(body, index):
    """Copies the annotation for even tweets; answers 'None' for odd ones (rejected by the gold check)."""
    content = body["messages"][1]["content"]
    text = content if isinstance(content, str) else next(p["text"] for p in content if p["type"] == "text")
    labels = re.search(r"Annotation to explain: (.*)", text).group(1)
    number = int(re.search(r"#(\d+)", text).group(1))
    return f"<think>{THINK}</think><answer>{labels if number % 2 == 0 else 'None'}</answer>"


def test_the_card_of_the_whole_graph_plots_consistency_by_teacher_and_the_grpo_filter(tmp_path, ray_local,
                                                                                     monkeypatch):
    """distill (template + llm from a teacher that is right half the time) then grpo_filter (a policy whose groups are
    informative for every fourth tweet): D1, D2 and D2_filtered load, the card shows consistency per teacher, the
    reward and filter-statistic histograms, tokens and cost, and links the filter report; dev/test records (with
    held-out chains) are in no split, and ``export`` of D2_filtered gives exactly the kept records."""
    import json

    from conftest import write_gmner_dataset
    from gmner_pipeline.export import export_split
    from gmner_pipeline.testing import FakeOpenAI
    from gmner_pipeline.view import write_view
    from support.grpo import ScriptedPolicy

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    full = "<think>Both.</think><answer>Alice Smith|PER|[10,5,50,70]; Paris|LOC|None</answer>"  # reward 1
    half = "<think>One.</think><answer>Alice Smith|PER|[10,5,50,70]</answer>"  # 0.5
    none = "<think>No.</think><answer>None</answer>"  # 0

    def policy(prompt):
        number = int(re.search(r"Paris #(\d+)", prompt).group(1))
        return [full, full, full, none, none, none, half, half] if number % 4 < 2 else [full] * 8

    data = write_gmner_dataset(tmp_path / "data", 16, with_xml_every=1)
    write_gmner_dataset(data, 4, split="test", with_xml_every=1)
    out = tmp_path / "out"
    with FakeOpenAI("teacher-a", reply_fn=half_right_teacher) as teacher, ScriptedPolicy(policy) as srv:
        cfg = {"run": {"output_dir": str(out), "shard_size": 8, "progress": False},
               "source": {"kind": "twitter_gmner", "path": str(data), "splits": ["train", "test"]},
               "pipeline": ["distill", "grpo_filter"],
               "stages": {"distill": {"styles": ["template", "llm"], "heldout_chains": True,
                                      "llm": {"routes": ["question_answer"]}},
                          "grpo_filter": {"prompt": {"image": False}}},
               "llm": {"roles": {"teacher": {"endpoints": [teacher.endpoint().model_dump()]},
                                 "policy": {"endpoints": [srv.endpoint(max_concurrency=4).model_dump()]}},
                       "cache": {"path": str(tmp_path / "llm-cache.sqlite")}},
               "card": {"prices": {"teacher": {"input_per_1m": 1.0, "output_per_1m": 4.0}}}}
        (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
        assert runner.run(load_config(str(tmp_path / "run.yaml"))).ok

    report = json.loads((out / "reports" / "grpo_filter.json").read_text())
    ds = _load(out, tmp_path / "hf")
    assert set(ds) == {"D1", "D2", "D2_filtered"}
    assert ds["D2_filtered"].num_rows == report["kept"] > 0
    assert report["items"] == ds["D2"].num_rows > report["kept"]
    assert all(r["keep"] for r in ds["D2_filtered"]["grpo"])
    for name in ds:
        assert set(ds[name]["split"]) == {"train"}  # the test records (with held-out chains) are in no split

    text = (out / "README.md").read_text()
    assert str(tmp_path) not in text and "127.0.0.1" not in text  # no machine's paths, no endpoint URLs
    assert "split: D2_filtered" in text and f"| D2_filtered | {report['kept']} |" in text
    plots = {p.name for p in (out / "card").glob("*.png")}
    assert {"chain_consistency.png", "rewards.png", "tokens_per_stage.png"} <= plots
    # consistency by style and teacher: templates always, the teacher on the even tweets (train and test alike)
    teacher_row = next(line for line in text.splitlines() if line.startswith("| llm | teacher-a"))
    assert "| 20 | 10 | 50.0% |" in teacher_row and "no_answer" not in teacher_row
    assert "| template | template | 40 | 40 | 100.0% |" in text
    assert "12 chains were written for dev/test records on request (held out)" in text
    # the filter: its report linked, removals by rule, thresholds
    assert "](reports/grpo_filter.json)" in text and "](reports/grpo_filter.png)" in text
    assert f"| low_std | std < 0.1 (population) | {report['dropped_by_first_rule']['low_std']} |" in text
    # the stage's own sampling (G = 8 at temperature 1.5), not the policy role's defaults
    assert "| grpo_filter | policy | policy | temperature: 1.5, top_p: 0.95, top_k: 200, max_tokens: 1024, n: 8 |" \
        in text
    # tokens and the teacher's cost (the policy has no price: its tokens are counted apart)
    assert "| distill | teacher | teacher-a" in text and "| total |" in text
    assert "tokens belong to roles without a price" in text

    exported = export_split(out, "D2_filtered", "swift", tmp_path / "swift", text_only=True)  # no images here
    rows = [json.loads(line) for line in (tmp_path / "swift" / "D2_filtered.jsonl").read_text().splitlines()]
    assert exported.records == report["kept"] and {r["id"].split("#")[0] for r in rows} == set(ds["D2_filtered"]["id"])

    view = write_view(out)
    index = json.loads(re.search(r"id='gmner-index'>(.*?)</script>", view.page.read_text()).group(1))
    kept = {e["id"] for e in index if e["grpo"] == "kept"}
    assert kept == set(ds["D2_filtered"]["id"])
    assert {e["grpo_reason"] for e in index if e["grpo"] == "dropped"} == {"low_std"}
