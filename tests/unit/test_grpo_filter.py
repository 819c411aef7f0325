"""grpo_filter with a scripted policy whose reward distributions are known: exact keep/drop decisions per rule and
their counts, unparsable answers scoring 0, failed requests recorded, the student prompt and CVO sampling sent, the
policy's frame, the rewards equal to the trainer's, and the report."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gmner_pipeline import student
from gmner_pipeline.frames import FrameConfig, to_frame
from gmner_pipeline.llm.services import llm_services
from gmner_pipeline.scoring import RewardConfig, gmner_reward, read_gold
from gmner_pipeline.shards import commit_shard, shard_path, write_records
from gmner_pipeline.stage import StageContext
from gmner_pipeline.stages.grpo_filter import GrpoFilterStage, GrpoFilterStageConfig
from gmner_pipeline.stages.grpo_filter.report import build_report, write_report
from gmner_pipeline.testing import Fault, FakeOpenAI
from gmner_pipeline.train.rewards import policy_reward
from gmner_pipeline.worker import run_batch, start_stage, stop_stage
from support.grpo import BOX, ScriptedPolicy, d2_record



def turn(answer: str) -> str:
    return f"<think>Alice Smith is a person in the photo.</think><answer>{answer}</answer>"


R10 = turn("Alice Smith|PER|[10,5,50,70]")  # every component right
R08 = turn("Alice Smith|LOC|[10,5,50,70]")  # wrong type
R06 = turn("Alice Smith|PER|None")          # not visible: grounding and entailment wrong
R04 = turn("Alice Smith|LOC|None")
R02 = turn("Bob|LOC|None")                  # only the count is right
R00 = turn("None")                          # no entity: p = 0 < q
BAD = "Alice Smith|PER|[10,5,50,70]"        # no tags: the format gate zeroes it
REWARD = {R10: 1.0, R08: 0.8, R06: 0.6, R04: 0.4, R02: 0.2, R00: 0.0, BAD: 0.0}

# one record per outcome; G = 8 rewards each, decisions by MCR's thresholds (std >= 0.1, max >= 0.8, median in
# [0.08, 0.6]); comments: sorted rewards, median
GROUPS: dict[str, tuple[list[str], bool, str | None]] = {
    "keep": ([R10, R06, R04, R04, R02, R00, R00, R06], True, None),             # 0 0 .2 .4 .4 .6 .6 1: .4
    "edge": ([R10, R06, R06, R06, R06, R00, R00, R00], True, None),             # median exactly 0.6: kept
    "constant": ([R10] * 8, False, "low_std"),                                  # std 0 (and median 1)
    "weak": ([R06, R04, R02, R00, R06, R04, R02, R00], False, "low_max"),       # max 0.6
    "hard": ([R10, R00, R00, R00, R00, R00, R00, R02], False, "median_below"),  # median 0
    "easy": ([R10, R10, R10, R10, R08, R08, R00, R00], False, "median_above"),  # median 0.9
    "garbage": ([BAD] * 8, False, "low_std"),                                    # unparsable: all 0
}


record = d2_record


def by_key(groups: dict[str, list[str]]) -> dict[str, list[str]]:
    """Scripts addressed by the record's key token, as it appears in the tweet of the prompt."""
    return {f"Paris {k}": g for k, g in groups.items()}


def stage_config(**overrides: Any) -> GrpoFilterStageConfig:
    return GrpoFilterStageConfig.model_validate({"prompt": {"image": False}, "batch_size": 16} | overrides)


def run(records: list[dict], server: FakeOpenAI, config: GrpoFilterStageConfig | None = None,
        **role: Any) -> tuple[list[dict], dict[str, int]]:
    """The stage as a worker runs it; returns the records and the stage's counters."""
    config = config or stage_config()
    llm = {"roles": {"policy": {"endpoints": [server.endpoint()], **role}}, "cache": {"enabled": False}}
    with llm_services(llm, {"policy"}) as resolved:
        stage = start_stage(GrpoFilterStage, config, StageContext(seed=7, llm=resolved))
        try:
            out = run_batch(stage, [dict(r) for r in records])
            return out, stage.take_counters()
        finally:
            stop_stage(stage)


def test_the_scripted_rewards_are_what_the_reward_function_gives():
    gold = [read_gold("Alice Smith|PER|[10,5,50,70]")[0][0]]
    for text, value in REWARD.items():
        assert gmner_reward(text, gold).total == pytest.approx(value), text


def test_each_rule_drops_exactly_its_groups_and_is_counted():
    with ScriptedPolicy(by_key({k: g for k, (g, _, _) in GROUPS.items()})) as srv:
        out, counters = run([record(k) for k in GROUPS], srv)
        assert srv.calls == len(GROUPS)  # one request per record: n = G
    result = {r["sample_key"]: r for r in out}
    for key, (texts, keep, reason) in GROUPS.items():
        g = result[key]["grpo"]
        assert result[key]["status"] == "ok", key
        assert (g["keep"], g["reason"]) == (keep, reason), key
        assert g["responses"] == texts and g["rewards"] == pytest.approx([REWARD[t] for t in texts]), key
        assert g["policy_id"] == "policy"
    assert counters["kept"] == 2 and counters["dropped:low_std"] == 2
    assert counters["dropped:low_max"] == counters["dropped:median_below"] == counters["dropped:median_above"] == 1
    assert counters["responses"] == 8 * len(GROUPS)
    assert counters["zeroed:format"] == 8  # the garbage group: unparsable responses score 0 through the format gate
    assert counters["zero_reward"] == sum(REWARD[t] == 0 for g, _, _ in GROUPS.values() for t in g)
    assert result["easy"]["grpo"]["median"] == pytest.approx(0.9)


def test_sampling_sends_the_student_prompt_and_cvo_settings():
    rec = record("keep")
    with ScriptedPolicy(by_key({"keep": GROUPS["keep"][0]})) as srv:
        run([rec], srv)
        body = srv.seen[0].body
    prompt = student.StudentPromptConfig(image=False)
    assert body["messages"] == student.text_only(student.build_messages(rec, prompt))
    assert (body["n"], body["temperature"], body["top_p"], body["top_k"], body["max_tokens"]) == (8, 1.5, 0.95, 200,
                                                                                                  1024)
    assert isinstance(body["seed"], int)


def test_a_failed_request_is_recorded_not_shortened():
    scripts = {"keep": GROUPS["keep"][0], "weak": GROUPS["weak"][0]}
    with ScriptedPolicy(by_key(scripts)) as srv:
        srv.fault_fn = lambda body, i: Fault.status_code(400, message="context too long") \
            if "Paris weak" in json.dumps(body["messages"]) else None
        out, counters = run([record("keep"), record("weak")], srv)
    ok, failed = out
    assert ok["status"] == "ok" and ok["grpo"]["keep"] is True
    assert failed["status"] == "error" and failed["error_stage"] == "grpo_filter"
    assert "0 of 8 samples came back" in failed["error"] and "context too long" in failed["error"]
    g = failed["grpo"]  # the group is in the record: 8 slots, none filled, never kept
    assert g["responses"] == [None] * 8 and g["rewards"] == [None] * 8
    assert (g["keep"], g["reason"]) == (False, "incomplete_group")
    assert counters == {**counters, "incomplete_group:bad_request": 1, "kept": 1}
    assert failed["error_kind"] == "permanent"  # the request itself is wrong: a rerun would fail the same way


def test_a_policy_down_is_a_transient_error_a_rerun_redoes():
    scripts = {"keep": GROUPS["keep"][0], "weak": GROUPS["weak"][0]}
    with ScriptedPolicy(by_key(scripts)) as srv:
        srv.fault_fn = lambda body, i: Fault.status_code(503) if "Paris weak" in json.dumps(body["messages"]) \
            else None
        out, counters = run([record("keep"), record("weak")], srv,
                            retry={"max_attempts": 2, "initial_backoff_s": 0.01, "max_total_s": 2})
    ok, failed = out
    assert ok["status"] == "ok" and failed["status"] == "error" and failed["error_kind"] == "transient"
    assert counters["incomplete_group:retries_exhausted"] == 1


def test_a_server_that_ignores_n_is_topped_up_and_a_lost_top_up_is_recorded():
    group = GROUPS["keep"][0]
    with ScriptedPolicy(by_key({"keep": group}), honor_n=False) as srv:
        out, _ = run([record("keep")], srv)
        assert srv.calls == 8  # 1 + 7 seeded requests (concurrent: the group comes back in any order)
        assert sorted(out[0]["grpo"]["responses"]) == sorted(group) and out[0]["grpo"]["keep"] is True
    with ScriptedPolicy(by_key({"keep": group}), honor_n=False) as srv:
        srv.fault_fn = lambda body, i: Fault.status_code(400) if i == 3 else None
        out, _ = run([record("keep")], srv)
    g = out[0]["grpo"]
    assert out[0]["status"] == "error" and "7 of 8 samples came back" in out[0]["error"]
    assert len(g["responses"]) == 8 and g["responses"].count(None) == 1 and g["rewards"].count(None) == 1
    assert g["reason"] == "incomplete_group" and g["keep"] is False


def test_only_d2_records_with_a_chain_are_sampled():
    records = [record("keep"), record("d1", split="D1"), record("nochain", consistent=False),
               record("dev", split=None, source_split="dev"), record("absent", grounding="absent")]
    with ScriptedPolicy(by_key({k: GROUPS["keep"][0] for k in ("keep", "d1", "nochain", "dev", "absent")})) as srv:
        out, counters = run(records, srv)
        assert srv.calls == 1
    sampled = [r["sample_key"] for r in out if r["grpo"]]
    assert sampled == ["keep"]
    assert [len(r["lineage"]) for r in out] == [1, 0, 0, 0, 1]  # the grounding-absent D2 record is seen, not sampled
    assert counters["skipped:grounding_absent"] == 1 and out[4]["status"] == "ok"


def test_a_multimodal_prompt_without_an_image_is_an_error_on_that_record():
    with ScriptedPolicy(by_key({"keep": GROUPS["keep"][0]})) as srv:
        out, counters = run([record("keep")], srv, stage_config(prompt={"image": True}))
        assert srv.calls == 0
    assert out[0]["status"] == "error" and "no image on disk" in out[0]["error"] and counters["bad_record"] == 1


def in_frame(frame: FrameConfig) -> str:
    box = ",".join(str(int(v)) for v in to_frame(BOX, 100, 80, frame))
    return turn(f"Alice Smith|PER|[{box}]")


def test_completions_are_scored_in_original_pixels_like_the_trainer():
    frame = FrameConfig(kind="qwen2_vl")  # 0-1000 of the width and height
    framed = [in_frame(frame), R06, in_frame(frame), R00, turn("Alice Smith|PER|[0,0,1000,1000]"), BAD, R04, R02]
    with ScriptedPolicy(by_key({"keep": framed})) as srv:
        out, _ = run([record("keep")], srv, stage_config(prompt={"image": False, "frame": {"kind": "qwen2_vl"}}))
    rewards = out[0]["grpo"]["rewards"]
    assert rewards[0] == pytest.approx(1.0) and rewards[4] < 1.0  # the frame's box maps back onto the gold box
    # the GRPO trainer's reward function on the same completions, with its dataset columns for this record
    from gmner_pipeline.train.data import DataStats, grpo_rows

    row = next(grpo_rows([record("keep")], student.StudentPromptConfig(image=False, frame=frame), DataStats()))
    trainer = policy_reward(RewardConfig(), frame)
    expected = trainer(None, framed, gold=[row["gold"]] * 8, width=[row["width"]] * 8, height=[row["height"]] * 8)
    assert rewards == pytest.approx(expected, abs=1e-7) and expected[0] == 1.0


def test_the_report_counts_each_rule_and_draws_the_histograms(tmp_path):
    with ScriptedPolicy(by_key({k: g for k, (g, _, _) in GROUPS.items()})) as srv:
        srv.fault_fn = lambda body, i: Fault.status_code(400) if "Paris weak" in json.dumps(body["messages"]) else None
        out, counters = run([record(k) for k in GROUPS] + [record("absent", grounding="absent")], srv)
    stage_dir = tmp_path / "grpo_filter" / "k"
    write_records(shard_path(stage_dir, 0), out)
    commit_shard(stage_dir, 0, {"counters": counters})
    report = build_report(stage_dir)
    assert (report["items"], report["kept"], report["incomplete_groups"]) == (6, 2, 1)  # "weak" failed: not an item
    assert report["dropped_by_first_rule"] == {"too_few_rewards": 0, "low_std": 2, "low_max": 0, "median_below": 1,
                                               "median_above": 1}
    assert report["not_sampled"] == {"grounding_absent": 1} and report["responses_zeroed"] == {"format": 8}
    entry = write_report(stage_dir, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "reports" / "grpo_filter.json").read_text())["kept"] == 2
    assert (tmp_path / "out" / "reports" / "grpo_filter.png").stat().st_size > 10_000
    assert entry["summary"].startswith("kept 2 of 6 groups") and "1 groups with a failed request" in entry["summary"]
    # a report redrawn from the stored float32 rewards reaches the stage's own decisions, the 0.6 edge included
    stored = {r["sample_key"]: r["grpo"]["keep"] for r in out if r["grpo"] and r["status"] == "ok"}
    assert sum(stored.values()) == report["kept"] and stored["edge"] is True


def test_config_rejects_unknown_prompt_fields():
    with pytest.raises(ValueError, match="imagee"):
        GrpoFilterStageConfig.model_validate({"prompt": {"imagee": False}})


def test_a_new_sft_adapter_recomputes_this_stage_only(tmp_path):
    from gmner_pipeline.config import load_config
    from gmner_pipeline.plan import plan_run

    adapter = tmp_path / "sft" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_bytes(b"epoch 1")

    def keys(*sets: str) -> dict[str, str]:
        config = load_config(None, [f"run.output_dir={tmp_path / 'out'}", "pipeline=[template_cot, grpo_filter]",
                                    *sets])
        return {s.name: s.key for s in plan_run(config).stages}

    served = ["llm.roles.policy={endpoints: [{base_url: 'http://vllm:8000/v1', model: policy}], adapter: "
              f"'{adapter}'}}"]
    local = [f"llm.roles.policy.local={{base_model: tiny-qwen, adapter: '{adapter}'}}"]
    before = {"served": keys(*served), "local": keys(*local)}
    fewer = keys(*served, "stages.grpo_filter.samples=4")
    (adapter / "adapter_model.safetensors").write_bytes(b"epoch 2")  # a new SFT adapter
    for kind, sets in (("served", served), ("local", local)):
        after = keys(*sets)
        assert after["template_cot"] == before[kind]["template_cot"], kind
        assert after["grpo_filter"] != before[kind]["grpo_filter"], kind
    assert fewer["template_cot"] == before["served"]["template_cot"] != fewer["grpo_filter"]


def test_a_multimodal_policy_gets_the_image_in_its_frame_and_answers_in_it(tmp_path):
    import base64
    import io

    from PIL import Image

    from gmner_pipeline.frames import model_image_size

    path = tmp_path / "photo.png"
    Image.new("RGB", (640, 427), (90, 120, 30)).save(path)
    rec = record("keep")
    rec["image"] = {"path": str(path), "uri": None, "sha256": None, "width": 640, "height": 427}
    frame = FrameConfig(kind="qwen2_5_vl")
    box = ",".join(str(int(v)) for v in to_frame(BOX, 640, 427, frame))
    answer = turn(f"Alice Smith|PER|[{box}]")  # the gold box, in pixels of the resized image the policy sees
    with ScriptedPolicy(by_key({"keep": [answer] * 4 + [R00] * 4})) as srv:
        out, _ = run([rec], srv, stage_config(prompt={"image": True, "frame": {"kind": "qwen2_5_vl"}}))
        content = srv.seen[0].body["messages"][0]["content"]
    assert [p["type"] for p in content] == ["image_url", "text"]
    data = base64.b64decode(content[0]["image_url"]["url"].split(",", 1)[1])
    assert Image.open(io.BytesIO(data)).size == model_image_size(frame, 640, 427) != (640, 427)
    assert "pixels of the image as you see it" in content[1]["text"]  # the frame's sentence in the instruction
    assert out[0]["grpo"]["rewards"] == [1.0] * 4 + [0.0] * 4  # mapped back to original pixels before IoU
