"""Coordinate frames, the D1/D2 split owner and the student prompt builder (shared by grpo_filter, train, predict)."""

from __future__ import annotations

import random

import pytest
from PIL import Image

from gmner_pipeline.answer import parse_answer
from gmner_pipeline.frames import (FrameConfig, FrameError, from_frame, model_image_size, prepare_image,
                                   smart_resize, text_from_frame, text_to_frame, to_frame)
from gmner_pipeline.schema import empty_record
from gmner_pipeline.splits import D1, D2, DatasetConfig, assign_split, dataset_split
from gmner_pipeline.student import (StudentPromptConfig, build_messages, prompt_hash, target_answer, target_turn,
                                    to_hf, to_openai, user_text)

QWEN25 = FrameConfig(kind="qwen2_5_vl")
QWEN2 = FrameConfig(kind="qwen2_vl")


# --- frames --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("h,w", [(480, 640), (1080, 1920), (100, 100), (4000, 3000), (28, 56), (333, 517)])
def test_smart_resize_multiples_and_budget(h, w):
    rh, rw = smart_resize(h, w)
    assert rh % 28 == 0 and rw % 28 == 0
    assert 256 * 28 * 28 <= rh * rw <= 1024 * 28 * 28
    assert abs(rw / rh - w / h) / (w / h) < 0.15  # aspect kept up to rounding


def test_smart_resize_known_values():
    # worked by hand: 640x480 -> rounded 476x644 (area 306,544, inside the budget)
    assert smart_resize(480, 640) == (476, 644)
    assert smart_resize(1080, 1920) == (672, 1176)  # shrunk into 1024*28*28 (floor to multiples of 28)
    with pytest.raises(FrameError):
        smart_resize(10, 3000)  # aspect 300 > 200


@pytest.mark.parametrize("frame", [FrameConfig(), QWEN25, QWEN2, FrameConfig(kind="normalized", scale=1.0,
                                                                               integer=False)])
def test_round_trip_within_rounding(frame):
    rng = random.Random(0)
    for _ in range(200):
        w, h = rng.randint(50, 3000), rng.randint(50, 3000)
        if max(w, h) / min(w, h) > 150:
            continue
        x1, y1 = rng.uniform(0, w - 2), rng.uniform(0, h - 2)
        box = (x1, y1, rng.uniform(x1 + 1, w), rng.uniform(y1 + 1, h))
        back = from_frame(to_frame(box, w, h, frame), w, h, frame)
        ew, eh = model_image_size(frame, w, h) if frame.kind == "qwen2_5_vl" else (w, h)
        tol_x = 0.5 * w / (1000 if frame.kind == "qwen2_vl" else ew) + 1e-6 if frame.integer else 1e-6
        tol_y = 0.5 * h / (1000 if frame.kind == "qwen2_vl" else eh) + 1e-6 if frame.integer else 1e-6
        for a, b, tol in zip(box, back, (tol_x, tol_y, tol_x, tol_y)):
            assert abs(a - b) <= tol + 1e-9


def test_qwen2_vl_is_thousandths():
    assert to_frame((0, 0, 320, 240), 640, 480, QWEN2) == (0, 0, 500, 500)
    assert from_frame((500, 500, 1000, 1000), 640, 480, QWEN2) == (320, 240, 640, 480)


def test_prepare_image_makes_server_resize_identity():
    img = Image.new("RGB", (640, 480))
    sent = prepare_image(img, QWEN25)
    assert sent.size == (644, 476)
    assert smart_resize(sent.height, sent.width) == (sent.height, sent.width)  # the server changes nothing
    assert prepare_image(img, FrameConfig()) is img


def test_box_literals_in_text_round_trip():
    text = "Obama is at [64,48,320,240] and again [ 0 , 0 , 640 , 480 ]; (1,2) is not a box"
    framed = text_to_frame(text, 640, 480, QWEN2)
    assert "[100,100,500,500]" in framed and "[0,0,1000,1000]" in framed and "(1,2)" in framed
    assert text_from_frame(framed, 640, 480, QWEN2).startswith("Obama is at [64,48,320,240]")
    assert text_to_frame(text, 640, 480, FrameConfig()) == text


# --- D1 / D2 ---------------------------------------------------------------------------------------------------------

def test_assign_split_deterministic_and_fractional():
    ids = [f"src/train/{i}" for i in range(4000)]
    first = [assign_split(i, 7, 0.3) for i in ids]
    assert first == [assign_split(i, 7, 0.3) for i in ids]
    share = first.count(D1) / len(ids)
    assert 0.27 < share < 0.33
    assert {assign_split(i, 7, 0.0) for i in ids} == {D2}
    assert {assign_split(i, 7, 1.0) for i in ids} == {D1}
    assert [assign_split(i, 8, 0.3) for i in ids] != first  # the seed matters


def test_dev_and_test_records_never_get_a_training_split():
    cfg = DatasetConfig(d1_fraction=0.5)
    for split in ("dev", "test", None, "validation"):
        for i in range(200):
            assert dataset_split({"id": f"x/{split}/{i}", "split": split}, cfg, 0) is None
    assert dataset_split({"id": "x/train/1", "split": "train"}, cfg, 0) in (D1, D2)


# --- the student prompt ----------------------------------------------------------------------------------------------

def _record(tmp_path, with_image=True):
    path = tmp_path / "img.png"
    Image.new("RGB", (640, 480), (120, 30, 30)).save(path)
    return empty_record(
        id="s/train/1", source="s", split="train", text="Obama visits Paris &amp; Rome",
        tokens=["Obama", "visits", "Paris", "&amp;", "Rome"],
        image={"path": str(path) if with_image else None, "uri": None, "sha256": None, "width": 640, "height": 480},
        grounding_labels="present",
        entities=[{"text": "Obama", "start": 0, "end": 1, "type": "PER", "fine_type": None,
                   "boxes": [[64, 48, 320, 240]]},
                  {"text": "Paris", "start": 2, "end": 3, "type": "LOC", "fine_type": None, "boxes": []}],
        detections={"model_id": "m", "backend": "onnxruntime", "annotation_text": "person: [60,40,330,250]",
                    "boxes": [{"label": "person", "score": 0.9, "box": [60, 40, 330, 250]}]},
        knowledge=[{"entity": "Obama", "type": "PER", "fine_type": "politician", "knowledge": "A tall man in a suit.",
                    "answers": [], "voted": None, "cache_key": None}])


def test_multimodal_prompt_has_image_first_and_no_hints_by_default(tmp_path):
    rec = _record(tmp_path)
    msgs = build_messages(rec, StudentPromptConfig(frame=QWEN2))
    parts = msgs[-1]["content"]
    assert parts[0]["type"] == "image" and parts[1]["type"] == "text"
    text = parts[1]["text"]
    assert "Tweet: Obama visits Paris & Rome" in text  # tokens joined, HTML unescaped
    assert "0-1000" in text and "detector" not in text and "tall man" not in text


def test_text_only_prompt_gets_detections_in_frame_and_knowledge(tmp_path):
    rec = _record(tmp_path, with_image=False)
    cfg = StudentPromptConfig(image=False, frame=QWEN2)
    msgs = build_messages(rec, cfg)
    assert len(msgs[-1]["content"]) == 1
    text = user_text(rec, cfg)
    assert "person: [94,83,516,521]" in text  # 60/640*1000 = 93.75 -> 94 ...
    assert "Obama (politician): A tall man in a suit." in text


def test_missing_image_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no image on disk"):
        build_messages(_record(tmp_path, with_image=False), StudentPromptConfig())


def test_targets_in_the_policy_frame_parse_back_to_gold(tmp_path):
    rec = _record(tmp_path)
    cfg = StudentPromptConfig(frame=QWEN2)
    answer = target_answer(rec, cfg)
    assert answer == "Obama|PER|[100,100,500,500]; Paris|LOC|None"
    turn = target_turn(rec, {"think": "Obama is boxed at [64,48,320,240].", "answer": "Obama|PER|[64,48,320,240]"},
                       cfg)
    assert "[100,100,500,500]" in turn and "[64,48,320,240]" not in turn
    assert parse_answer(turn).ok


def test_prompt_hash_follows_settings(tmp_path):
    assert prompt_hash(StudentPromptConfig()) == prompt_hash(StudentPromptConfig())
    assert prompt_hash(StudentPromptConfig()) != prompt_hash(StudentPromptConfig(image=False))
    assert prompt_hash(StudentPromptConfig()) != prompt_hash(StudentPromptConfig(frame=QWEN25))


def test_openai_and_hf_forms_resize_for_the_frame(tmp_path):
    rec = _record(tmp_path)
    cfg = StudentPromptConfig(frame=QWEN25)
    msgs = build_messages(rec, cfg)
    oa = to_openai(msgs, cfg)
    assert oa[-1]["content"][0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    conv, images = to_hf(msgs, cfg)
    assert conv[-1]["content"][0] == {"type": "image"} and images[0].size == (644, 476)
