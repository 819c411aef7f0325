"""The distill stage against in-process fake teachers: the accept path in model frames, the gold check and its
reasons, re-asking, faults, D1/D2 and held-out splits, per-style keys and the style store, the teachers comparison."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import pytest
from pydantic import ValidationError

from gmner_pipeline.answer import Triple, format_answer, gold_triples, parse_answer
from gmner_pipeline.frames import FrameConfig, model_image_size, text_from_frame, text_to_frame, to_frame
from gmner_pipeline.schema import GROUNDING_ABSENT, empty_record
from gmner_pipeline.splits import D1, D2, DatasetConfig
from gmner_pipeline.stages import load_stage
from gmner_pipeline.stages.distill import DistillConfig, DistillStage
from gmner_pipeline.stages.distill.check import CheckConfig, check_turn
from gmner_pipeline.testing import Fault, FakeOpenAI, run_stage

GOOD_THINK = ("Eileen Collins is a person named in the tweet; she is shown on the left of the photo. "
              "NASA is an organisation that the image shows twice, on the patches.")


def tweet(key: str = "1", split: str = "train", entities=None, image: dict | None = None, **fields):
    tokens = "RT @ nasa : Eileen Collins and Grace Hopper visit NASA in Houston today".split()
    if entities is None:
        entities = [
            {"text": "Eileen Collins", "start": 4, "end": 6, "type": "PER", "fine_type": None,
             "boxes": [[10, 20, 200, 400]]},
            {"text": "Grace Hopper", "start": 7, "end": 9, "type": "PER", "fine_type": None, "boxes": []},
            {"text": "NASA", "start": 10, "end": 11, "type": "ORG", "fine_type": None,
             "boxes": [[300, 5, 350, 40], [400, 5, 450, 40]]},
        ]
    fields.setdefault("grounding_labels", "present")
    fields.setdefault("image", image or {"path": None, "uri": None, "sha256": None, "width": 640, "height": 480})
    return empty_record(id=f"test/{split}/{key}", source="test", split=split, sample_key=key,
                        text=" ".join(tokens) + f" #{key}", tokens=tokens + [f"#{key}"], entities=entities, **fields)


def user_text_of(body: dict) -> str:
    content = body["messages"][1]["content"]
    return content if isinstance(content, str) else next(p["text"] for p in content if p["type"] == "text")


def labels_in(body: dict) -> str:
    """The gold annotation the stage put in the prompt (in the teacher's frame)."""
    return re.search(r"Annotation to explain: (.*)", user_text_of(body)).group(1)


def copying_teacher(think: str = GOOD_THINK):
    """A teacher that answers exactly the annotation it was shown (so: in its own frame)."""
    return lambda body, i: f"<think>{think}</think><answer>{labels_in(body)}</answer>"


def llm_config(srv: FakeOpenAI, tmp_path: Path, frame: dict | None = None, role: str = "teacher", **more) -> dict:
    roles = {role: {"endpoints": [srv.endpoint(max_concurrency=8).model_dump()],
                    "retry": {"initial_backoff_s": 0.01, "max_backoff_s": 0.05, "jitter_s": 0, "max_total_s": 5},
                    "circuit": {"cooldown_s": 0.05, "max_cooldown_s": 0.1}, **({"frame": frame} if frame else {})}}
    roles.update(more)
    return {"roles": roles, "cache": {"path": str(tmp_path / "cache.sqlite")}}


def distill(records, teachers=None, context=None, **config):
    """The stage on records; ``teachers``: the llm section (roles); ``config``: the stage's section."""
    config.setdefault("styles", ["llm"])
    return run_stage(DistillStage, records, config, llm=teachers, context=context or {})


# --- config ---------------------------------------------------------------------------------------------------------

def test_registered_defaults_and_roles():
    assert load_stage("distill") is DistillStage
    cfg = DistillConfig()
    assert cfg.styles == ["template", "llm"] and cfg.llm.routes == ["question_answer", "few_conclusions"]
    assert DistillStage.llm_roles(cfg) == {"teacher"}
    assert DistillStage.reads_for(cfg) == frozenset()
    both = DistillConfig(styles=["llm", "mllm"], mllm={"teachers": ["vlm_a", "vlm_b"]})
    assert DistillStage.llm_roles(both) == {"teacher", "vlm_a", "vlm_b"}
    assert DistillStage.reads_for(both) == frozenset({"image"})
    assert DistillStage.llm_roles(DistillConfig(styles=["template"])) == set()
    for bad in ({"styles": ["llm", "llm"]}, {"styles": ["video"]}, {"llm": {"routes": ["sideways"]}},
                {"llm": {"teachers": []}}, {"llm": {"max_attempts": 0}}, {"nonsense": 1}):
        with pytest.raises(ValidationError):
            DistillConfig(**bad)


def test_key_payload_covers_what_shapes_chains_only():
    base = DistillConfig(styles=["template"])
    payload = base.key_payload()
    assert "llm" not in payload and "mllm" not in payload and "resources" not in payload
    assert "reuse" not in payload and "records_in_flight" not in payload
    # a disabled style's section does not key the stage; an enabled one does
    assert DistillConfig(styles=["template"], llm={"max_attempts": 5}).key_payload() == payload
    assert (DistillConfig(styles=["template", "llm"], llm={"max_attempts": 5}).key_payload()
            != DistillConfig(styles=["template", "llm"]).key_payload())
    assert DistillConfig(styles=["template"], reuse=False, records_in_flight=3).key_payload() == payload
    assert set(DistillConfig(styles=["template", "llm"]).key_payload()["prompt_hashes"]) == {"template", "llm"}


def test_editing_a_teacher_prompt_file_changes_the_key(monkeypatch):
    import gmner_pipeline.stages.distill.config as mod

    before = DistillConfig().key_payload()["prompt_hashes"]
    real = mod.prompt_hash
    monkeypatch.setattr(mod, "prompt_hash", lambda *names: real(*names) + ("x" if "distill/llm/style.txt" in names
                                                                           else ""))
    after = DistillConfig().key_payload()["prompt_hashes"]
    assert after["llm"] != before["llm"] and after["template"] == before["template"]


# --- the gold check -------------------------------------------------------------------------------------------------

GOLD = [Triple("Obama", "PER", ((10.0, 20.0, 110.0, 220.0),)), Triple("Paris", "LOC", None)]
ANSWER = "Obama|PER|[10,20,110,220]; Paris|LOC|None"


@pytest.mark.parametrize("text, finish, reason", [
    (f"<think>{GOOD_THINK}</think><answer>{ANSWER}</answer>", "length", "truncated"),
    (f"<think>{GOOD_THINK}</think><answer>Obama is a person</answer>", "stop", "unparsable"),
    (f"<think>{GOOD_THINK}</think>", "stop", "unparsable"),
    (f"<think>{GOOD_THINK}</think><answer>Obama|PER|[10,20,110,220]</answer>", "stop", "wrong_answer"),
    (f"<think>{GOOD_THINK}</think><answer>Obama|PER|None; Paris|LOC|None</answer>", "stop", "wrong_answer"),
    (f"<think>{GOOD_THINK}</think><answer>Obama|ORG|[10,20,110,220]; Paris|LOC|None</answer>", "stop",
     "wrong_answer"),
    (f"<answer>{ANSWER}</answer>", "stop", "short_think"),
    (f"<think>  ok  </think><answer>{ANSWER}</answer>", "stop", "short_think"),
    (f"<think>As the gold answer says, {GOOD_THINK}</think><answer>{ANSWER}</answer>", "stop", "leaks_labels"),
    (f"<think>{GOOD_THINK} This matches the Given Labels.</think><answer>{ANSWER}</answer>", "stop", "leaks_labels"),
])
def test_check_names_the_first_problem(text, finish, reason):
    verdict = check_turn(text, GOLD, finish_reason=finish)
    assert not verdict.consistent and verdict.reason == reason and verdict.rejection.startswith(reason + ": ")


def test_check_accepts_eval_rule_matches_and_writes_the_gold_answer_in_the_teachers_order():
    # IoU >= 0.5 with the gold box and the triples swapped: consistent; the stored answer has the exact gold box
    text = f"<think>{GOOD_THINK}</think><answer>Paris|LOC|None; Obama|PER|[12,22,112,222]</answer>"
    verdict = check_turn(text, GOLD)
    assert verdict.consistent and verdict.rejection is None
    assert verdict.answer == "Paris|LOC|None; Obama|PER|[10,20,110,220]"
    teacher = check_turn(text, GOLD, config=CheckConfig(answer_from="teacher"))
    assert teacher.answer == "Paris|LOC|None; Obama|PER|[12,22,112,222]"
    assert not check_turn(text, GOLD, config=CheckConfig(leak_phrases=("EILEEN",))).consistent
    assert check_turn(f"<think>x</think><answer>{ANSWER}</answer>", GOLD,
                      config=CheckConfig(min_think_chars=0)).consistent
    assert check_turn(f"<think>{GOOD_THINK}</think><answer>None</answer>", []).consistent


@pytest.mark.parametrize("frame", [
    FrameConfig(kind="qwen2_vl"),
    FrameConfig(kind="qwen2_5_vl"),
    FrameConfig(kind="qwen2_5_vl", min_pixels=4 * 28 * 28, max_pixels=64 * 28 * 28),
    FrameConfig(kind="normalized", scale=100),
])
def test_a_chain_round_trips_through_a_frame_and_is_judged_in_original_pixels(frame):
    w, h = 1200, 6800  # far from square and over the qwen2_5_vl pixel budget: a misread box lands elsewhere
    gold = [Triple("Obama", "PER", ((40.0, 80.0, 1160.0, 5680.0), (400.0, 6000.0, 1160.0, 6760.0))),
            Triple("Paris", "LOC", None)]
    think = "Obama stands at [40,80,1160,5680] and again at [400,6000,1160,6760]; Paris is not shown."
    answer = format_answer(gold)
    in_frame = text_to_frame(think, w, h, frame), text_to_frame(answer, w, h, frame)
    assert in_frame[1] != answer and "[40,80,1160,5680]" not in in_frame[0]  # the teacher writes other numbers
    back = text_from_frame(in_frame[0], w, h, frame)
    ex, ey = {"qwen2_vl": (1000, 1000), "normalized": (frame.scale, frame.scale)}.get(
        frame.kind, model_image_size(frame, w, h))
    tolerance = 1 + max(w / ex, h / ey)  # one unit of the frame, in pixels, plus rounding
    for a, b in zip(re.findall(r"\d+", back), re.findall(r"\d+", think)):
        assert abs(int(a) - int(b)) <= tolerance  # integer rounding in the frame, nothing more
    verdict = check_turn(f"<think>{in_frame[0]}</think><answer>{in_frame[1]}</answer>", gold, frame=frame,
                         size=(w, h))
    assert verdict.consistent, verdict.rejection
    assert verdict.answer == answer and verdict.think == back
    # read as original pixels instead, the same text is wrong: the conversion is what makes it right
    assert check_turn(f"<think>{in_frame[0]}</think><answer>{in_frame[1]}</answer>", gold).reason == "wrong_answer"


# --- the accept path: a fake teacher answering in its own frame -----------------------------------------------------

@pytest.mark.parametrize("frame", [None, {"kind": "qwen2_vl"}, {"kind": "qwen2_5_vl"}])
def test_teacher_answering_in_its_frame_is_consistent_and_stored_in_original_pixels(tmp_path, frame):
    with FakeOpenAI(reply_fn=copying_teacher()) as srv:
        out = distill([tweet()], llm_config(srv, tmp_path, frame))
        sent = labels_in(srv.seen[0].body)
    rec = out[0]
    assert rec["status"] == "ok"
    chains = rec["cot"]["chains"]
    assert [c["route"] for c in chains] == ["question_answer", "few_conclusions"]
    for c in chains:
        assert c["consistent"] and c["rejection"] is None and c["attempts"] == 1
        assert c["model_id"] == "fake-model" and c["style"] == "llm" and c["frame"] == (frame or {}).get("kind",
                                                                                                          "original")
        assert c["text"] == f"<think>{c['think']}</think><answer>{c['answer']}</answer>"
        parsed = parse_answer(c["answer"]).triples
        assert sorted(parsed, key=repr) == sorted(gold_triples(rec), key=repr)  # exact gold boxes, original pixels
        assert c["prompt_tokens"] > 0 and c["style_key"] and c["heldout"] is False
    if frame:  # the teacher saw boxes in its frame, not the gold pixels
        assert "[10,20,200,400]" not in sent and "NASA|ORG|[" in sent
    else:
        assert "[10,20,200,400]" in sent


def test_frame_mismatch_is_caught_by_the_check(tmp_path):
    """A teacher that answers in 0-1000 while its role says 'original' does not pass: frames are a role property."""
    def in_qwen2_vl(body, i):
        gold = [Triple("Eileen Collins", "PER", ((10, 20, 200, 400),)), Triple("Grace Hopper", "PER", None),
                Triple("NASA", "ORG", ((300, 5, 350, 40), (400, 5, 450, 40)))]
        frame = FrameConfig(kind="qwen2_vl")
        framed = [Triple(t.entity, t.type, None if t.boxes is None else tuple(to_frame(b, 640, 480, frame)
                                                                               for b in t.boxes)) for t in gold]
        return f"<think>{GOOD_THINK}</think><answer>{format_answer(framed)}</answer>"

    with FakeOpenAI(reply_fn=in_qwen2_vl) as srv:
        wrong = distill([tweet()], llm_config(srv, tmp_path / "a"),
                        llm={"routes": ["few_conclusions"], "max_attempts": 1})
        right = distill([tweet()], llm_config(srv, tmp_path / "b", {"kind": "qwen2_vl"}),
                        llm={"routes": ["few_conclusions"], "max_attempts": 1})
    assert [c["rejection"].split(":")[0] for c in wrong[0]["cot"]["chains"]] == ["wrong_answer"]
    assert [c["consistent"] for c in right[0]["cot"]["chains"]] == [True]


def test_n_chains_are_one_request_with_n_seeded_and_reproducible(tmp_path):
    records = [tweet(str(i)) for i in range(5)]
    with FakeOpenAI(reply_fn=copying_teacher()) as srv:
        out = distill(records, llm_config(srv, tmp_path / "a"), llm={"chains": 3})
        first = [(s.body["seed"], s.body["n"], json.dumps(s.body["messages"])) for s in srv.seen]
        distill(records, llm_config(srv, tmp_path / "b"), llm={"chains": 3})  # fresh cache: sent again
        second = [(s.body["seed"], s.body["n"], json.dumps(s.body["messages"])) for s in srv.seen[len(first):]]
    assert len(first) == 5 * 2 and {n for _, n, _ in first} == {3}  # one request per record and route
    assert sorted(first) == sorted(second)  # same seeds and prompts: a rerun is reproducible
    assert len({seed for seed, _, _ in first}) == 10
    for rec in out:
        assert len(rec["cot"]["chains"]) == 6 and all(c["consistent"] for c in rec["cot"]["chains"])


def test_every_request_of_a_route_starts_with_the_same_static_prefix(tmp_path):
    records = [tweet(str(i)) for i in range(4)]
    with FakeOpenAI(reply_fn=copying_teacher()) as srv:
        distill(records, llm_config(srv, tmp_path))
    systems = {}
    for s in srv.seen:
        assert s.body["messages"][0]["role"] == "system" and s.body["messages"][1]["role"] == "user"
        route = "qa" if "questions and answers" in s.body["messages"][0]["content"] else "fc"
        systems.setdefault(route, set()).add(s.body["messages"][0]["content"])
    assert {k: len(v) for k, v in systems.items()} == {"qa": 1, "fc": 1}
    a, b = (next(iter(v)) for v in systems.values())
    assert a[:1000] == b[:1000]  # the routes share the task text too; only the route's paragraph differs


def test_triple_and_field_order_vary_with_the_seed(tmp_path):
    records = [tweet(str(i)) for i in range(30)]
    with FakeOpenAI(reply_fn=copying_teacher()) as srv:
        out = distill(records, llm_config(srv, tmp_path), llm={"routes": ["question_answer"]})
        orders = {tuple(t.entity for t in parse_answer(labels_in(s.body)).triples) for s in srv.seen}
        fields = {re.search(r"state (.*)\.", user_text_of(s.body)).group(1) for s in srv.seen}
    assert len(orders) >= 4 and len(fields) == 6
    # the stored answers follow the teacher's order (which follows the prompt's)
    assert len({r["cot"]["chains"][0]["answer"] for r in out}) >= 4


def test_hints_knowledge_and_detections_reach_the_prompt_in_the_teachers_frame(tmp_path):
    rec = tweet(knowledge=[{"entity": "NASA", "type": "ORG", "fine_type": "government_agency",
                            "knowledge": "A blue round logo with white letters.", "answers": [], "voted": None,
                            "cache_key": None}],
                detections={"model_id": "rtmdet", "backend": "onnxruntime", "annotation_text": "person: [1,2,3,4]",
                             "boxes": [{"label": "person", "score": 0.9, "box": [64, 48, 320, 240]}]})
    with FakeOpenAI(reply_fn=copying_teacher()) as srv:
        distill([rec], llm_config(srv, tmp_path, {"kind": "qwen2_vl"}), llm={"routes": ["question_answer"]})
        text = user_text_of(srv.seen[0].body)
        distill([rec], llm_config(srv, tmp_path / "b"), llm={"routes": ["question_answer"],
                                                                  "knowledge": "never", "detections": "never"})
        plain = user_text_of(srv.seen[-1].body)
    assert "government_agency" in text and "blue round logo" in text
    assert "person: [100,100,500,500]" in text  # detector box in 0-1000
    assert "logo" not in plain and "person:" not in plain


# --- re-asking, leaks, faults ---------------------------------------------------------------------------------------

def test_a_rejected_chain_is_asked_again_with_feedback_until_right(tmp_path):
    def teacher(body, i):
        if len(body["messages"]) == 2:  # first ask: a wrong answer
            return f"<think>{GOOD_THINK}</think><answer>Eileen Collins|PER|None</answer>"
        assert "not the correct one" in body["messages"][-1]["content"]  # the feedback says what was wrong
        assert body["messages"][2]["role"] == "assistant"
        return copying_teacher()(body, i)

    with FakeOpenAI(reply_fn=teacher) as srv:
        out = distill([tweet()], llm_config(srv, tmp_path), llm={"routes": ["question_answer"]})
    (chain,) = out[0]["cot"]["chains"]
    assert chain["consistent"] and chain["attempts"] == 2 and srv.calls == 2


def test_max_attempts_then_a_recorded_rejection(tmp_path):
    leaking = copying_teacher("Reading the given labels, " + GOOD_THINK)
    with FakeOpenAI(reply_fn=leaking) as srv:
        out = run_stage(DistillStage, [tweet(str(i)) for i in range(3)],
                        {"styles": ["llm"], "llm": {"max_attempts": 3, "routes": ["question_answer"]}},
                        llm=llm_config(srv, tmp_path))
    for rec in out:
        (chain,) = rec["cot"]["chains"]
        assert not chain["consistent"] and chain["attempts"] == 3 and chain["rejection"].startswith("leaks_labels")
    assert srv.calls == 9


def test_resampling_without_feedback(tmp_path):
    with FakeOpenAI(reply_fn=lambda body, i: "no tags at all") as srv:
        out = distill([tweet()], llm_config(srv, tmp_path), llm={"routes": ["question_answer"],
                                                                     "feedback": False, "max_attempts": 2})
    assert [len(s.body["messages"]) for s in srv.seen] == [2, 2]  # the same prompt, a new seed
    assert srv.seen[0].body["seed"] != srv.seen[1].body["seed"]
    assert out[0]["cot"]["chains"][0]["rejection"].startswith("unparsable")


def test_truncated_and_wrong_format_answers_are_rejected_with_counts(tmp_path):
    replies = iter([("<think>long", "length"), ("Obama? maybe.", "stop")] * 10)
    lock = threading.Lock()

    def teacher(body, i):
        with lock:
            return next(replies)

    stage_counts = {}
    with FakeOpenAI(reply_fn=teacher) as srv:
        cfg = DistillConfig(styles=["llm"], llm={"routes": ["question_answer"], "max_attempts": 2})
        from gmner_pipeline.llm.services import llm_services
        from gmner_pipeline.stage import StageContext
        from gmner_pipeline.worker import run_batch, start_stage, stop_stage

        with llm_services(llm_config(srv, tmp_path), {"teacher"}) as resolved:
            stage = start_stage(DistillStage, cfg, StageContext(llm=resolved))
            out = run_batch(stage, [tweet()])
            stage_counts = stage.take_counters()
            stop_stage(stage)
    (chain,) = out[0]["cot"]["chains"]
    assert chain["attempts"] == 2 and chain["rejection"].startswith("unparsable")
    assert stage_counts["llm:chains"] == 1 and stage_counts["llm:rejected:unparsable"] == 1
    assert stage_counts["llm:reasks"] == 1 and "llm:consistent" not in stage_counts


def test_429_storm_and_a_replica_dying_mid_shard_lose_nothing(tmp_path):
    records = [tweet(str(i)) for i in range(20)]
    with FakeOpenAI(reply_fn=copying_teacher()) as a, FakeOpenAI(reply_fn=copying_teacher()) as b:
        a.faults += [Fault.status_code(429, retry_after=0)] * 15
        calls = {"n": 0}
        lock = threading.Lock()

        def die_after_some(body, index):
            with lock:
                calls["n"] += 1
                if calls["n"] == 6:
                    threading.Thread(target=b.stop).start()  # replica b dies while requests are in flight
            return None

        b.fault_fn = die_after_some
        cfg = llm_config(a, tmp_path)
        cfg["roles"]["teacher"]["endpoints"].append(b.endpoint(max_concurrency=8).model_dump())
        out = distill(records, cfg)
    assert all(r["status"] == "ok" for r in out)
    assert sum(len(r["cot"]["chains"]) for r in out) == 40
    assert all(c["consistent"] for r in out for c in r["cot"]["chains"])
    assert b.dead and b.calls >= 1


def test_dead_teacher_marks_records_with_a_transient_error_and_the_run_goes_on(tmp_path):
    srv = FakeOpenAI(reply_fn=copying_teacher()).start()

    def die(body, index):  # the only replica dies at the first request (after the run's preflight saw it alive)
        threading.Thread(target=srv.stop).start()
        return Fault.drop()

    srv.fault_fn = die
    cfg = llm_config(srv, tmp_path)
    cfg["roles"]["teacher"]["retry"] = {"max_attempts": 3, "initial_backoff_s": 0.01, "max_total_s": 2}
    out = run_stage(DistillStage, [tweet("1"), tweet("2", split="dev")], {"styles": ["template", "llm"]}, llm=cfg)
    srv.stop()
    assert out[0]["status"] == "error" and out[0]["error_stage"] == "distill"
    assert "teacher 'teacher'" in out[0]["error"] and "transient" in out[0]["error"]
    assert out[0]["error_kind"] == "transient"  # a rerun redoes it (run.redo_errors)
    assert out[1]["status"] == "ok" and out[1]["cot"]["skipped"] == "not_training_split"  # the rest goes on


def test_a_bad_request_is_a_permanent_rejection_on_the_chain(tmp_path):
    with FakeOpenAI(reply_fn=copying_teacher()) as srv:
        srv.faults += [Fault.status_code(400, message="prompt longer than the context")]
        out = distill([tweet()], llm_config(srv, tmp_path), llm={"routes": ["question_answer"], "chains": 2})
    assert out[0]["status"] == "ok"
    chains = out[0]["cot"]["chains"]
    assert len(chains) == 2 and all(c["rejection"].startswith("llm_bad_request") for c in chains)


# --- mllm: images ---------------------------------------------------------------------------------------------------

def image_file(tmp_path: Path, size=(640, 480)) -> dict:
    from PIL import Image

    path = tmp_path / f"img-{size[0]}x{size[1]}.png"
    Image.new("RGB", size, (200, 30, 30)).save(path)
    return {"path": str(path), "uri": None, "sha256": "x", "width": size[0], "height": size[1]}


def test_mllm_sends_the_image_first_sized_by_the_frame(tmp_path):
    import base64
    import io

    from PIL import Image

    rec = tweet(image=image_file(tmp_path))
    with FakeOpenAI(reply_fn=copying_teacher()) as srv:
        out = distill([rec], llm_config(srv, tmp_path, {"kind": "qwen2_5_vl"}, role="vlm_teacher"),
                      styles=["mllm"])
    content = srv.seen[0].body["messages"][1]["content"]
    assert content[0]["type"] == "image_url" and content[1]["type"] == "text"
    data = content[0]["image_url"]["url"].split(",", 1)[1]
    assert Image.open(io.BytesIO(base64.b64decode(data))).size == (644, 476)  # smart_resize of 640x480, not shrunk
    (chain,) = out[0]["cot"]["chains"]
    assert chain["consistent"] and chain["style"] == "mllm" and chain["frame"] == "qwen2_5_vl"


def test_mllm_missing_image_is_a_record_error_and_no_image_is_a_skip(tmp_path):
    gone = tweet("1", image={"path": str(tmp_path / "gone.jpg"), "uri": None, "sha256": None, "width": 640,
                             "height": 480})
    none = tweet("2")
    with FakeOpenAI(reply_fn=copying_teacher()) as srv:
        out = distill([gone, none], llm_config(srv, tmp_path, role="vlm_teacher"), styles=["template", "mllm"])
    assert out[0]["status"] == "error" and "image not found" in out[0]["error"] and "gone.jpg" in out[0]["error"]
    assert out[1]["status"] == "ok" and {c["style"] for c in out[1]["cot"]["chains"]} == {"template"}
    assert srv.calls == 0


def test_several_mllm_teachers_keep_their_chains_under_their_model_ids(tmp_path):
    rec = tweet(image=image_file(tmp_path))
    with FakeOpenAI("vlm-a", reply_fn=copying_teacher()) as a, FakeOpenAI("vlm-b", reply_fn=copying_teacher()) as b:
        cfg = llm_config(a, tmp_path, role="vlm_a", vlm_b={"endpoints": [b.endpoint().model_dump()],
                                                           "frame": {"kind": "qwen2_vl"}})
        out = distill([rec], cfg, styles=["mllm"], mllm={"teachers": ["vlm_a", "vlm_b"]})
    chains = out[0]["cot"]["chains"]
    assert sorted((c["model_id"], c["frame"], c["consistent"]) for c in chains) == [
        ("vlm-a", "original", True), ("vlm-b", "qwen2_vl", True)]
    assert len({c["style_key"] for c in chains}) == 2


# --- D1/D2 and held-out splits --------------------------------------------------------------------------------------

def test_split_and_held_out_records(tmp_path):
    train = [tweet(str(i)) for i in range(30)]
    held = [tweet(f"d{i}", split="dev") for i in range(3)] + [tweet(f"t{i}", split="test") for i in range(3)]
    dataset = DatasetConfig(d1_fraction=0.5, split_seed=1)
    out = run_stage(DistillStage, train + held, {"styles": ["template"]}, context={"dataset": dataset})
    assert {r["cot"]["split"] for r in out[:30]} == {D1, D2}
    for r in out[30:]:
        assert r["cot"]["split"] is None and r["cot"]["chains"] == [] and r["cot"]["skipped"] == "not_training_split"
    asked = run_stage(DistillStage, held, {"styles": ["template"], "heldout_chains": True},
                      context={"dataset": dataset})
    for r in asked:
        assert r["cot"]["split"] is None and r["cot"]["chains"]
        assert all(c["heldout"] is True and c["consistent"] for c in r["cot"]["chains"])
    # publishing selects by cot.split and refuses anything else: held-out chains never reach D1/D2
    from gmner_pipeline.publish import split_of_records

    published = split_of_records(out[:30] + asked, dataset, with_filtered=False)
    assert sum(len(v) for v in published.values()) == 30
    assert not any(r["split"] != "train" for v in published.values() for r in v)


def test_absent_grounding_and_other_styles(tmp_path):
    rec = tweet(grounding_labels=GROUNDING_ABSENT)
    out = run_stage(DistillStage, [rec], {"styles": ["template"]})
    assert out[0]["cot"]["skipped"] == "grounding_absent" and out[0]["cot"]["chains"] == []
    other = {"style": "foreign", "route": "x", "model_id": "m", "seed": 1, "think": "t", "answer": "None",
             "text": "<think>t</think><answer>None</answer>", "consistent": True, "rejection": None, "attempts": 1}
    kept = run_stage(DistillStage, [tweet(cot={"chains": [other], "split": None, "skipped": None})],
                     {"styles": ["template"]})
    assert kept[0]["cot"]["chains"][0]["style"] == "foreign" and len(kept[0]["cot"]["chains"]) == 3


# --- per-style keys and the style store -----------------------------------------------------------------------------

def test_a_new_llm_teacher_re_requests_nothing_for_the_mllm_style(tmp_path):
    records = [tweet(str(i), image=image_file(tmp_path)) for i in range(4)]
    with FakeOpenAI("llm-v1", reply_fn=copying_teacher()) as t1, FakeOpenAI("llm-v2", reply_fn=copying_teacher()) \
            as t2, FakeOpenAI("vlm", reply_fn=copying_teacher()) as v:
        def cfg(teacher):
            c = llm_config(teacher, tmp_path)
            c["roles"]["vlm_teacher"] = {"endpoints": [v.endpoint().model_dump()], "frame": {"kind": "qwen2_vl"}}
            return c

        first = distill(records, cfg(t1), styles=["template", "llm", "mllm"])
        vlm_calls = v.calls
        second = distill(records, cfg(t2), styles=["template", "llm", "mllm"])
        assert v.calls == vlm_calls == 4  # the mllm chains came from the style store
        assert t2.calls == 8  # the new llm teacher was asked
        # the request cache alone (reuse off) also sends nothing: it rebuilds the prompts and finds the answers
        third = distill(records, cfg(t1), styles=["template", "llm", "mllm"], reuse=False)
        assert v.calls == 4 and t1.calls == 8
    for a, b, c in zip(first, second, third):
        mllm = [[ch for ch in r["cot"]["chains"] if ch["style"] == "mllm"] for r in (a, b, c)]
        assert mllm[0] == mllm[1]  # taken from the store as they were
        # rebuilt from cached answers: the same chains, only the latency is this run's (a cache lookup)
        assert [{**ch, "seconds": None} for ch in mllm[0]] == [{**ch, "seconds": None} for ch in mllm[2]]
        llm_ids = {ch["model_id"] for ch in b["cot"]["chains"] if ch["style"] == "llm"}
        assert llm_ids == {"llm-v2"}


def test_style_store_misses_when_the_records_inputs_change(tmp_path):
    rec = tweet()
    with FakeOpenAI(reply_fn=copying_teacher()) as srv:
        distill([rec], llm_config(srv, tmp_path))
        distill([rec], llm_config(srv, tmp_path))
        assert srv.calls == 2
        changed = tweet(knowledge=[{"entity": "NASA", "type": "ORG", "fine_type": None, "knowledge": "a logo",
                                    "answers": [], "voted": None, "cache_key": None}])
        distill([changed], llm_config(srv, tmp_path))
        assert srv.calls == 4  # new prompt text: asked again


# --- the teachers comparison ----------------------------------------------------------------------------------------

def write_folder(out: Path, key: str, records: list[dict], roles: dict[str, str]) -> None:
    from gmner_pipeline.shards import MANIFEST, commit_shard, shard_path, write_json_atomic, write_records

    folder = out / "distill" / key
    folder.mkdir(parents=True)
    write_json_atomic(folder / MANIFEST, {"stage": "distill", "key": key,
                                          "llm": {"roles": {r: {"model": m} for r, m in roles.items()}}})
    write_records(shard_path(folder, 0), records)
    commit_shard(folder, 0, {"records_in": len(records), "seconds": 1.5, "run_id": f"run-{key}"})


def test_teachers_comparison_side_by_side(tmp_path):
    records = [tweet(str(i)) for i in range(10)]
    good = copying_teacher()

    def sometimes_wrong(body, i):
        return good(body, i) if "#1" not in user_text_of(body) and "#2" not in user_text_of(body) else "nope"

    with FakeOpenAI("teacher-a", reply_fn=good) as a, FakeOpenAI("teacher-b", reply_fn=sometimes_wrong) as b:
        out_a = distill(records, llm_config(a, tmp_path / "a"), styles=["template", "llm"],
                        llm={"routes": ["question_answer"], "max_attempts": 2})
        out_b = distill(records, llm_config(b, tmp_path / "b"), styles=["template", "llm"],
                        llm={"routes": ["question_answer"], "max_attempts": 2})
    write_folder(tmp_path / "out", "aaaa", out_a, {"teacher": "teacher-a"})
    write_folder(tmp_path / "out", "bbbb", out_b, {"teacher": "teacher-b"})

    from gmner_pipeline.stages.distill.compare import compare_teachers

    comparison = compare_teachers(tmp_path / "out")
    by = {(v.style, v.model_id): v.summary() for v in comparison.versions}
    assert set(by) == {("template", None), ("llm", "teacher-a"), ("llm", "teacher-b")}
    assert by[("template", None)]["records"] == 10 and by[("template", None)]["chains"] == 20  # counted once
    assert by[("template", None)]["folders"] == ["aaaa", "bbbb"]
    assert by[("llm", "teacher-a")]["consistency_rate"] == 1.0
    assert by[("llm", "teacher-b")]["consistent_chains"] == 8 and by[("llm", "teacher-b")]["rejections"] == {
        "unparsable": 2}
    assert by[("llm", "teacher-b")]["attempts_per_chain"] == pytest.approx(1.2)
    assert by[("llm", "teacher-a")]["prompt_tokens"] > 0
    pair = next(p for p in comparison.pairs if {p["a"], p["b"]} == {v.label for v in comparison.versions
                                                                    if v.style == "llm"})
    assert pair["records_both_asked"] == 10 and pair["both_consistent"] == 8 and pair["share_both_consistent"] == 0.8

    from typer.testing import CliRunner

    from gmner_pipeline.cli import app

    res = CliRunner().invoke(app, ["teachers", str(tmp_path / "out"), "--json"])
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.output)["versions"]) == 3
    table = CliRunner().invoke(app, ["teachers", str(tmp_path / "out")])
    assert table.exit_code == 0 and "teacher-b" in table.output and "80.0%" in table.output
    empty = CliRunner().invoke(app, ["teachers", str(tmp_path)])
    assert empty.exit_code == 2 and "holds no distill output" in empty.output


# --- the plan: what a new teacher recomputes ------------------------------------------------------------------------

def test_a_teacher_change_rekeys_distill_and_nothing_before(tmp_path, monkeypatch):
    from gmner_pipeline.config import load_config
    from gmner_pipeline.plan import plan_run

    def keys(*sets):
        config = load_config(None, [f"run.output_dir={tmp_path}", "pipeline=[passthrough, distill]",
                                    "llm.roles.teacher.endpoints=[{base_url: 'http://t:8000/v1', model: m}]", *sets])
        return [s.key for s in plan_run(config).stages]

    base = keys()
    for change in ("llm.roles.teacher.endpoints=[{base_url: 'http://t:8000/v1', model: other}]",
                   "llm.roles.teacher.revision=r2", "llm.roles.teacher.sampling.temperature=0.9",
                   "llm.roles.teacher.frame={kind: qwen2_vl}", "stages.distill.llm.max_attempts=5"):
        moved = keys(change)
        assert moved[0] == base[0] and moved[1] != base[1], change
    # another replica of the same model, or more concurrency: same outputs, same key
    assert keys("llm.roles.teacher.endpoints=[{base_url: 'http://u:9000/v1', model: m, max_concurrency: 99}]") == base
    # a teacher of a style that does not run does not key the stage
    assert keys("stages.distill.styles=[template]") == keys("stages.distill.styles=[template]",
                                                            "llm.roles.teacher.revision=r3")
    # editing a teacher prompt file rekeys too
    import gmner_pipeline.stages.distill.config as mod

    real = mod.prompt_hash
    monkeypatch.setattr(mod, "prompt_hash", lambda *names: real(*names) + "-edited")
    assert keys()[1] != base[1] and keys()[0] == base[0]


def test_bundled_distill_configs_plan(monkeypatch, tmp_path):
    from gmner_pipeline.config import load_config
    from gmner_pipeline.plan import plan_run

    sample = load_config("sample_distill", [f"run.output_dir={tmp_path}"])
    assert sample.stage_config("distill").styles == ["template", "llm"]
    assert plan_run(sample).stages[0].name == "distill"
    monkeypatch.setenv("GMNER_DATA", str(tmp_path))
    monkeypatch.setenv("GMNER_IMAGES", str(tmp_path / "images"))
    for var in ("TEACHER_URL", "VLM_TEACHER_URL"):
        monkeypatch.setenv(var, "http://vllm:8000/v1")
    monkeypatch.setenv("TEACHER_MODEL", "Qwen/Qwen2.5-72B-Instruct")
    monkeypatch.setenv("VLM_TEACHER_MODEL", "Qwen/Qwen2.5-VL-72B-Instruct")
    full = load_config("twitter_gmner_vllm", [f"run.output_dir={tmp_path}"])
    stage = plan_run(full).stages[0]
    assert stage.cls.llm_roles(stage.config) == {"teacher", "vlm_teacher"}
    assert full.llm.role("vlm_teacher").frame.kind == "qwen2_5_vl"
    assert stage.manifest()["llm"]["roles"]["vlm_teacher"]["frame"]["kind"] == "qwen2_5_vl"
    from gmner_pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="image"):  # the mllm style needs images: refused before anything runs
        plan_run(load_config("twitter_gmner_vllm", [f"run.output_dir={tmp_path}", "source.image_dir=null"]))
