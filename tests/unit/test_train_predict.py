"""predict's pure parts: answers mapped back to original pixels, the gold-knowledge guard, the JSONL that eval reads;
and the frames helper it leans on."""

from __future__ import annotations

import json

import pytest

from gmner_pipeline.frames import FrameConfig, map_box_literals
from gmner_pipeline.scoring.io import load_predictions
from gmner_pipeline.student import StudentPromptConfig
from gmner_pipeline.train.predict import PredictError, check_gold_knowledge, gold_knowledge_leaks, prediction_line
from support.train_records import toy_record

KNOWLEDGE = [{"entity": "Alice Smith", "type": "PER", "knowledge": "A woman with short hair."}]


def test_prediction_boxes_are_mapped_back_to_original_pixels(tmp_path):
    record = toy_record(0)  # 100 x 80
    prompt = StudentPromptConfig(image=True, frame=FrameConfig(kind="qwen2_vl"))
    line = prediction_line(record, "<think>..</think><answer>Alice Smith|PER|[100,62,500,875]; Paris|LOC|None"
                                   "</answer>", prompt)
    assert line["status"] == "ok"
    assert line["triples"] == [{"entity": "Alice Smith", "type": "PER", "boxes": [[10.0, 4.96, 50.0, 70.0]]},
                               {"entity": "Paris", "type": "LOC", "boxes": None}]
    assert "[100,62,500,875]" in line["completion"]  # the raw text stays as the model wrote it
    bad = prediction_line(record, "I do not know", prompt)
    assert bad["status"] == "unparsable" and bad["triples"] == [] and bad["errors"]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in (line, dict(bad, id="toy/train/1"))) + "\n")
    preds = load_predictions([path])
    assert preds.by_id["toy/train/0"].status == "ok" and preds.by_id["toy/train/1"].status == "unparsable"
    assert preds.by_id["toy/train/0"].triples[0].boxes == ((10.0, 4.96, 50.0, 70.0),)


def test_gold_knowledge_on_eval_splits_is_refused_unless_allowed():
    text = StudentPromptConfig(image=False)  # text policies read the knowledge (auto)
    records = [toy_record(0, split="dev", knowledge=KNOWLEDGE), toy_record(1, split="train", knowledge=KNOWLEDGE),
               toy_record(2, split="test")]
    assert gold_knowledge_leaks(records, text) == ["toy/dev/0"]
    assert gold_knowledge_leaks(records, StudentPromptConfig(image=False, knowledge="never")) == []
    assert gold_knowledge_leaks(records, StudentPromptConfig(image=True)) == []  # multimodal: knowledge off (auto)
    predicted = [toy_record(3, split="test", knowledge=[dict(KNOWLEDGE[0], entity_source="predicted")])]
    assert gold_knowledge_leaks(predicted, text) == []
    with pytest.raises(PredictError, match="GOLD entities"):
        check_gold_knowledge(records, text, allow=False)
    check_gold_knowledge(records, text, allow=True)  # warns, goes on


def test_map_box_literals_leaves_a_literal_alone_when_the_mapper_says_none():
    text = "a [1, 2, 3, 4.5] b [5,6,7,8]"
    out = map_box_literals(text, lambda b: (0, 0, 1, 1) if b[0] == 5 else None)
    assert out == "a [1, 2, 3, 4.5] b [0,0,1,1]"
