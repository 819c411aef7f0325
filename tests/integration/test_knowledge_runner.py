"""The knowledge stage through the real runner on Ray (actor pools of 2, several shards) against scripted fake servers:
each unique (entity, type) of the whole input is asked once per generator, the voter and the summary once each,
the result does not depend on shard size or pool size, a worker killed in the table pass is replaced and its unit
redone (the request cache answers what had been asked), and a rerun makes zero calls."""

from __future__ import annotations

import json
import re
from pathlib import Path

import psutil
import pytest
import yaml

from gmner_pipeline import runner
from gmner_pipeline.config import load_config
from gmner_pipeline.shards import iter_committed_records
from gmner_pipeline.summary import stage_totals
from gmner_pipeline.testing import FakeOpenAI

pytestmark = pytest.mark.integration

NAMES = ["Ada Lovelace", "Alan Turing", "Grace Hopper", "Paris", "London", "NASA", "Falcon 9"]
TYPES = {"Paris": "LOC", "London": "LOC", "NASA": "ORG", "Falcon 9": "OTHER"}
ASPECT = {"PER": "gender", "LOC": "whereabouts", "ORG": "logo", "OTHER": "appearance"}


def write_dataset(root: Path, n: int) -> set[tuple[str, str]]:
    """n tweets, tweet i mentions NAMES[i % 7] and NAMES[(i * 3) % 7]; returns the unique (entity, type) pairs."""
    (root / "txt").mkdir(parents=True)
    (root / "xml").mkdir()
    lines, pairs = [], set()
    for i in range(n):
        lines.append(f"IMGID:{3000 + i}")
        for name in dict.fromkeys([NAMES[i % 7], NAMES[(i * 3) % 7]]):
            type_ = TYPES.get(name, "PER")
            pairs.add((name, type_))
            words = name.split()
            lines += [f"{words[0]}\tB-{type_}", *(f"{w}\tI-{type_}" for w in words[1:]), "and\tO"]
        lines += [f"#{i}\tO", ""]
    (root / "txt" / "train.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return pairs


def generator(body):
    user = body["messages"][-1]["content"]
    entity = re.search(r"^Entity: (.*)$", user, re.M).group(1)
    aspect = re.search(r"^- (\w+): ", user, re.M).group(1)
    return json.dumps({"fine_type": "x", "aspects": {aspect: f"{entity} looks distinctive and recognisable."}})


def voter(body):
    user = body["messages"][-1]["content"]
    entity = re.search(r'"([^"]+)"', user).group(1)
    aspect = re.search(r"^(\w+):$", user, re.M).group(1)
    return json.dumps({"fine_type": "x", "aspects": [{"aspect": aspect, "support": ["A", "B"],
                                                      "text": f"{entity} looks distinctive and recognisable."}]})


def config_file(tmp_path: Path, out: str, servers, shard_size: int, pool: int, cache: bool) -> Path:
    names = ["knowledge_gen_1", "knowledge_gen_2", "knowledge_voter", "knowledge_summary"]
    roles = {name: {"endpoints": [{"base_url": s.base_url, "model": s.model, "max_concurrency": 4}],
                    "retry": {"max_attempts": 2, "initial_backoff_s": 0.05, "max_total_s": 20}}
             for name, s in zip(names, servers)}
    cfg = {"run": {"output_dir": str(tmp_path / out), "shard_size": shard_size, "progress": False},
           "source": {"kind": "twitter_gmner", "path": str(tmp_path / "data")},
           "pipeline": ["knowledge"],
           "stages": {"knowledge": {"generators": names[:2], "entities_in_flight": 4,
                                    "resources": {"num_cpus": 0.25, "pool_size": pool, "table_units": 3}}},
           "llm": {"roles": roles, "cache": {"enabled": cache, "path": str(tmp_path / "llm-cache.sqlite")}}}
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def knowledge(result) -> dict:
    return {r["id"]: [(k["entity"], k["type"], k["knowledge"], k["context_id"], k["status"]) for k in r["knowledge"]]
            for r in iter_committed_records(result.plan.stages[-1].dir)}


def test_each_entity_is_asked_once_on_ray_whatever_the_sharding_and_a_rerun_makes_no_call(tmp_path, ray_local):
    pairs = write_dataset(tmp_path / "data", 26)
    servers = [FakeOpenAI(model=m, reply=r, delay_s=0.01).start()
               for m, r in (("gen-a", generator), ("gen-b", generator), ("voter", voter),
                            ("summary", lambda body: "Looks distinctive."))]
    try:
        first = runner.run(load_config(str(config_file(tmp_path, "a", servers, 4, 2, cache=False))))
        assert first.ok and first.ingest["num_shards"] == 7
        assert [s.calls for s in servers] == [len(pairs)] * 4  # 7 unique (entity, type) pairs in 26 tweets
        records = knowledge(first)
        assert len(records) == 26 and all(k[4] == "ok" for ks in records.values() for k in ks)
        # the context of an entity is its first mention in the whole input, not in a shard
        assert records["twitter-gmner-v2/train/3008"][0][3] == "twitter-gmner-v2/train/3001"
        totals = stage_totals(first.plan.stages[-1].dir)
        assert totals["table_units"] == 3 and totals["table_keys"] == len(pairs)

        again = runner.run(load_config(str(config_file(tmp_path, "a", servers, 4, 2, cache=False))))
        assert again.ok and again.stages["knowledge"].processed_now == 0
        assert [s.calls for s in servers] == [len(pairs)] * 4  # a rerun makes zero calls

        other = runner.run(load_config(str(config_file(tmp_path, "b", servers, 9, 1, cache=False))))
        assert other.ok and other.ingest["num_shards"] == 3
        assert [s.calls for s in servers] == [2 * len(pairs)] * 4
        assert knowledge(other) == records  # shard size and pool size change nothing
    finally:
        for s in servers:
            s.stop()


def _kill_stage_workers() -> int:
    killed = 0
    for proc in psutil.process_iter(["cmdline", "name"]):
        text = " ".join(proc.info["cmdline"] or []) + " " + (proc.info["name"] or "")
        if "ray::ShardActor" in text:
            proc.kill()
            killed += 1
    return killed


def test_a_worker_killed_in_the_table_pass_is_redone_and_the_cache_answers_what_was_asked(tmp_path, ray_local):
    pairs = write_dataset(tmp_path / "data", 14)
    killed: list[int] = []

    def killing_voter(body):  # the 3rd voter request kills the stage's workers (like an OOM kill), once
        if len(servers[2].seen) >= 3 and not killed:
            killed.append(_kill_stage_workers())
        return voter(body)

    servers = [FakeOpenAI(model=m, reply=r, delay_s=0.01).start()
               for m, r in (("gen-a", generator), ("gen-b", generator), ("voter", killing_voter),
                            ("summary", lambda body: "Looks distinctive."))]
    try:
        result = runner.run(load_config(str(config_file(tmp_path, "a", servers, 4, 2, cache=True))))
        assert killed and killed[0] >= 1
        assert result.ok, result.failed
        records = knowledge(result)
        assert len(records) == 14 and all(k[4] == "ok" for ks in records.values() for k in ks)
        # the redone units asked again only what the cache had not stored before the kill
        assert len(pairs) <= servers[0].calls < 2 * len(pairs)
        # the same config in a new folder: every request is answered from the cache
        calls = [s.calls for s in servers]
        again = runner.run(load_config(str(config_file(tmp_path, "b", servers, 5, 1, cache=True))))
        assert again.ok and [s.calls for s in servers] == calls and knowledge(again) == records
    finally:
        for s in servers:
            s.stop()
