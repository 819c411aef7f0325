"""The card's facts from records that carry the fields the knowledge (1.1), distill (1.1) and grpo_filter stages add:
per-role tokens, costs, chain consistency by teacher, reward plots. Without those fields, nothing is added."""

from __future__ import annotations

from gmner_pipeline.card.config import CardConfig
from gmner_pipeline.card.facts import Tally, costs, filter_thresholds, portable, role_tokens
from gmner_pipeline.card.plots import draw_plots
from gmner_pipeline.card.render import header


def _record(i, split="D2"):
    chains = [
        {"style": "template", "model_id": None, "consistent": True},
        {"style": "llm", "model_id": "qwen72b", "consistent": i % 2 == 0, "rejection": None if i % 2 == 0 else
         "wrong_box: missing ['Paris|LOC']", "prompt_tokens": 100, "completion_tokens": 50},
    ]
    knowledge = [{"entity": "Paris", "type": "LOC", "status": "ok", "cache_key": f"k{i % 2}",
                  "tokens": [{"role": "gen_a", "model_id": "a", "prompt_tokens": 10, "completion_tokens": 5},
                             {"role": "voter", "model_id": "v", "prompt_tokens": 20, "completion_tokens": 2}]}]
    return {"id": f"s/train/{i}", "split": "train", "status": "ok", "grounding_labels": "present",
            "entities": [{"text": "Paris", "type": "LOC", "fine_type": "city", "boxes": [[0, 0, 5, 5]] * (i % 3)}],
            "detections": {"boxes": [{"label": "person", "box": [0, 0, 1, 1]}]},
            "knowledge": knowledge, "cot": {"chains": chains, "split": split},
            "grpo": {"rewards": [0.1 * i, 0.5, None], "mean": 0.3, "std": 0.2, "max": 0.5, "median": 0.3,
                     "keep": i % 2 == 0, "reason": None if i % 2 == 0 else "low_std"},
            "lineage": [{"stage": "knowledge", "model_ids": ["a", "v"], "prompt_tokens": 30, "completion_tokens": 7,
                         "prompt_hash": "kh"},
                        {"stage": "distill", "model_ids": ["qwen72b"], "prompt_tokens": 100, "completion_tokens": 50,
                         "prompt_hash": "dh"},
                        {"stage": "grpo_filter", "model_ids": ["policy@1"], "prompt_tokens": 40,
                         "completion_tokens": 80, "prompt_hash": "gh"}]}


STAGES = [
    {"stage": "knowledge", "roles": {"gen_a": {"model": "a"}, "voter": {"model": "v"}}},
    {"stage": "distill", "roles": {"teacher": {"model": "qwen72b"}}},
    {"stage": "grpo_filter", "roles": {"policy": {"model": "policy@1"}}},
]


def test_new_stage_fields_feed_tokens_costs_and_teacher_consistency():
    tally = Tally()
    for i in range(4):
        tally.add(_record(i), with_dataset=True)
    assert tally.chains[("llm", "qwen72b")] == 4 and tally.consistent[("llm", "qwen72b")] == 2
    assert tally.records_with_detections == 4 and tally.detector_labels == {"person": 4}
    nothing_found = _record(9)
    nothing_found["detections"] = {"boxes": []}  # the detector ran and found nothing: not a record with detections
    empty = Tally()
    empty.add(nothing_found, with_dataset=True)
    assert empty.records_with_detections == 0
    assert tally.rejections[("llm", "qwen72b", "wrong_box")] == 2
    rows = {(r["stage"], r["role"]): (r["prompt_tokens"], r["completion_tokens"]) for r in role_tokens(STAGES, tally)}
    assert rows[("knowledge", "gen_a")] == (20, 10)  # two entity keys, each computed once (not once per record)
    assert rows[("knowledge", "voter")] == (40, 4)
    assert rows[("distill", "teacher")] == (400, 200)  # from the chains' own tokens
    assert rows[("grpo_filter", "policy")] == (160, 320)  # one role: the whole lineage
    card = CardConfig(prices={"teacher": {"input_per_1m": 1.0, "output_per_1m": 2.0},
                              "policy": {"input_per_1m": 0.0, "output_per_1m": 1000.0}})
    cost = costs(role_tokens(STAGES, tally), card)
    by = {(c["stage"], c["role"]): c["cost"] for c in cost["items"]}
    assert by[("distill", "teacher")] == round(400 / 1e6 + 200 * 2 / 1e6, 6)
    assert by[("grpo_filter", "policy")] == round(320 * 1000 / 1e6, 6)
    assert cost["unpriced_tokens"] == 20 + 10 + 40 + 4
    assert tally.rewards and sorted(tally.group_keep) == ["kept", "low_std"]
    assert filter_thresholds({"filter": {"min_std": 0.1, "median_low": 0.08}, "samples": 8}) == {
        "min_std": 0.1, "median_low": 0.08}


def test_plots_are_drawn_only_with_data(tmp_path):
    facts = {"entity_types": {}, "fine_types": {}, "boxes_per_entity": {}, "grounded_entities": 0,
             "visible_entities": 0, "detector_labels": {}, "records_with_detections": 0, "chains": [],
             "rewards": [], "group_stats": {}, "filter_thresholds": {}, "stages": [], "plots": True}
    assert draw_plots(facts, tmp_path) == []
    facts.update(rewards=[0.1, 0.9, 0.5], group_stats={"std": [0.2], "median": [0.3]},
                 filter_thresholds={"min_std": 0.1}, detector_labels={"person": 3}, records_with_detections=2)
    drawn = draw_plots(facts, tmp_path)
    assert [p for _, p in drawn] == ["card/detector_labels.png", "card/rewards.png"]
    assert (tmp_path / "card" / "rewards.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    facts.update(rewards=[], group_stats={})
    draw_plots(facts, tmp_path)
    assert not (tmp_path / "card" / "rewards.png").exists()  # a plot of an earlier run without data now is removed


def test_header_leaves_out_empty_splits_and_paths_are_portable():
    facts = {"title": "t", "splits": {"D1": 3, "D2_filtered": 1}, "population_is_dataset": True,
             "final_stage_path": "x/y"}
    files = header(facts)["configs"][0]["data_files"]
    assert files == [{"split": "D1", "path": "dataset/D1/*.parquet"},
                     {"split": "D2_filtered", "path": "dataset/D2_filtered/*.parquet"}]
    assert portable("local:/home/me/models/qwen@ab12+adapter:cd34") == "local:qwen@ab12+adapter:cd34"
    assert portable("/data/models/rtmdet.onnx") == "rtmdet.onnx"
    assert portable("Qwen/Qwen2.5-VL-72B-Instruct") == "Qwen/Qwen2.5-VL-72B-Instruct"


def test_grpo_filter_section_reads_the_report_and_orders_rules_as_the_filter_applies_them():
    from gmner_pipeline.card.render import _grpo_filter

    report = {"items": 10, "kept": 4, "dropped_by_first_rule": {"median_above": 1, "low_std": 5, "too_few_rewards": 0},
              "failing_each_rule": {"median_above": 6, "low_std": 5}, "rules": {"low_std": "std < 0.1 (population)"},
              "incomplete_groups": 2, "not_sampled": {"grounding_absent": 3}, "responses": 80,
              "responses_zero_reward": 12, "responses_zeroed": {"format": 7}}
    facts = {"grpo_report": report, "group_outcomes": {"kept": 4}, "filter_thresholds": {"min_std": 0.1}}
    text = "\n".join(_grpo_filter(facts))
    assert "kept 4 of 10 complete groups (40.0%)" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split(" | ")[0][2:] for r in rows] == ["too_few_rewards", "low_std", "median_above"]
    assert "| low_std | std < 0.1 (population) | 5 | 5 |" in text and "| median_above | - | 1 | 6 |" in text
    assert "2 groups with a failed request" in text and "grounding_absent: 3" in text and "format: 7" in text
    assert "](reports/grpo_filter.json)" in text
    # without a report (an older run): the outcomes from the records only; without grpo: nothing
    assert "Groups: kept: 4" in "\n".join(_grpo_filter({**facts, "grpo_report": None}))
    assert _grpo_filter({"grpo_report": None, "group_outcomes": {}, "filter_thresholds": {}}) == []


def test_a_later_stage_on_the_teachers_model_is_not_given_the_chains_tokens():
    """The default run uses one embedded model as teacher and as policy: grpo_filter's tokens come from its own
    lineage entries, the chains' tokens stay with distill."""
    tally = Tally()
    for i in range(2):
        rec = _record(i)
        rec["cot"]["chains"][1]["model_id"] = "policy@1"
        rec["lineage"][1]["model_ids"] = ["policy@1"]
        tally.add(rec, with_dataset=True)
    stages = [{"stage": "distill", "roles": {"teacher": {"model": "policy@1"}}},
              {"stage": "grpo_filter", "roles": {"policy": {"model": "policy@1"}}}]
    rows = {(r["stage"], r["role"]): (r["prompt_tokens"], r["completion_tokens"]) for r in role_tokens(stages, tally)}
    assert rows == {("distill", "teacher"): (200, 100), ("grpo_filter", "policy"): (80, 160)}
