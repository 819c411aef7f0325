"""``gmner-pipeline eval`` on small inputs: Twitter-GMNER folder or record shards as gold, JSONL or shards as
predictions, missing / unknown / malformed predictions reported, JSON written."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

from gmner_pipeline.scoring.cli import eval_command
from gmner_pipeline.schema import empty_record, records_to_table


def app() -> typer.Typer:
    a = typer.Typer()
    a.command("eval")(eval_command)
    a.command("noop")(lambda: None)  # two commands keep the sub-command name, as in the main CLI
    return a


def write_dataset(root: Path) -> Path:
    (root / "txt").mkdir(parents=True)
    (root / "xml").mkdir()
    (root / "txt" / "test.txt").write_text(
        "IMGID:1\nAlice\tB-PER\nSmith\tI-PER\nvisits\tO\nParis\tB-LOC\n\n"
        "IMGID:2\nNBA\tB-ORG\nfinals\tO\n\n"
        "IMGID:3\nhello\tO\n\n", encoding="utf-8")
    (root / "xml" / "1.xml").write_text(
        "<annotation><size><width>100</width><height>80</height><depth>3</depth></size><object><name>Alice Smith"
        "</name><bndbox><xmin>10</xmin><ymin>5</ymin><xmax>50</xmax><ymax>70</ymax></bndbox></object></annotation>",
        encoding="utf-8")
    return root


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def invoke(*args: str):
    return CliRunner().invoke(app(), ["eval", *args])


def test_twitter_gmner_gold_and_jsonl_predictions(tmp_path):
    gold = write_dataset(tmp_path / "data")
    pred = write_jsonl(tmp_path / "pred.jsonl", [
        {"id": "1", "answer": "<think>x</think><answer>Alice Smith|PER|[12,5,50,70]; Paris|ORG|None</answer>"},
        {"id": "twitter-gmner-v2/test/2", "triples": [{"entity": "NBA", "type": "ORG", "boxes": None},
                                                      {"entity": "Lakers", "type": "ORG", "boxes": [[1, 2, 3, 4]]}]},
        "this line is not json",
        {"id": "999", "answer": "None"},
    ])
    out = tmp_path / "out" / "eval.json"
    res = invoke("--gold", str(gold), "--pred", str(pred), "-o", str(out))
    assert res.exit_code == 0, res.output
    assert "GMNER" in res.output and "1 gold records had no prediction" in res.output
    d = json.loads(out.read_text())
    assert (d["gmner"]["correct"], d["gmner"]["predicted"], d["gmner"]["gold"]) == (2, 4, 3)
    assert d["mner"]["correct"] == 2 and d["eeg"]["correct"] == 3
    assert d["visual_bias"] == {"n_count": 1, "n_rate": 0.25, "checked": 4}  # "Lakers" is not in tweet 2
    assert d["missing_predictions"] == 1 and d["missing_examples"] == ["twitter-gmner-v2/test/3"]
    assert d["unknown_prediction_ids"] == 1 and d["prediction_problem_count"] == 1
    assert d["parse_status"] == {"missing": 1, "ok": 2}
    assert "IoU >= 0.5" in d["rules"]["location"]


def test_shard_gold_and_shard_predictions(tmp_path):
    ents = [{"text": "Paris", "start": 0, "end": 1, "type": "LOC", "fine_type": None, "boxes": [[0, 0, 10, 10]]}]
    gold_rec = empty_record(id="s/1", source="s", tokens=["Paris", "!"], entities=ents, grounding_labels="present")
    shards = tmp_path / "gold"
    shards.mkdir()
    pq.write_table(records_to_table([gold_rec]), shards / "part-0.parquet")
    pred_rec = dict(gold_rec, entities=[dict(ents[0], boxes=[[0, 0, 10, 20]])])  # IoU exactly 0.5
    pq.write_table(records_to_table([pred_rec]), tmp_path / "pred.parquet")
    out = tmp_path / "eval.json"
    assert invoke("--gold", str(shards), "--pred", str(tmp_path / "pred.parquet"), "-o", str(out)).exit_code == 0
    assert json.loads(out.read_text())["gmner"]["f1"] == 1.0
    assert invoke("--gold", str(shards), "--pred", str(tmp_path / "pred.parquet"), "-o", str(out),
                  "--strict-iou").exit_code == 0
    assert json.loads(out.read_text())["gmner"]["f1"] == 0.0


@pytest.mark.parametrize("args,message", [
    (["--gold", "/nonexistent/x", "--pred", "p.jsonl"], "does not exist"),
    (["--pred-boxes", "some"], "pred_boxes"),
    (["--missing", "error"], "have no prediction"),
])
def test_errors_are_clear(tmp_path, args, message):
    gold = write_dataset(tmp_path / "data")
    pred = write_jsonl(tmp_path / "p.jsonl", [{"id": "1", "answer": "None"}])
    base = ["--gold", str(gold), "--pred", str(pred), "-o", str(tmp_path / "e.json")]
    res = invoke(*(base + args if args[0] != "--gold" else args))
    assert res.exit_code == 2 and message in res.output


def test_wrong_split_says_how_to_choose(tmp_path):
    gold = write_dataset(tmp_path / "data")
    pred = write_jsonl(tmp_path / "p.jsonl", [])
    res = invoke("--gold", str(gold), "--pred", str(pred), "--split", "dev", "-o", str(tmp_path / "e.json"))
    assert res.exit_code == 2 and "--split" in res.output


def test_run_output_folder_means_its_final_stage_and_duplicates_are_refused(tmp_path):
    ents = [{"text": "Paris", "start": 0, "end": 1, "type": "LOC", "fine_type": None, "boxes": []}]
    rec = empty_record(id="s/1", source="s", tokens=["Paris"], entities=ents, grounding_labels="present")
    out_dir = tmp_path / "run"
    for stage in ("ingest/k1", "cot/k2"):
        (out_dir / stage).mkdir(parents=True)
        pq.write_table(records_to_table([rec]), out_dir / stage / "shard-00000.parquet")
    pred = write_jsonl(tmp_path / "p.jsonl", [{"id": "s/1", "answer": "Paris|LOC|None"}])
    res = invoke("--gold", str(out_dir), "--pred", str(pred), "-o", str(tmp_path / "e.json"))
    assert res.exit_code == 2 and "ONE stage" in res.output
    (out_dir / "latest.json").write_text(json.dumps({"final_dir": str(out_dir / "cot" / "k2")}))
    res = invoke("--gold", str(out_dir), "--pred", str(pred), "-o", str(tmp_path / "e.json"))
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "e.json").read_text())["gmner"]["f1"] == 1.0


def test_no_prediction_matching_any_gold_record_is_an_error(tmp_path):
    """Predictions of another split (or with ids the gold does not have) would score 0 silently: exit 2 and say so."""
    gold = write_dataset(tmp_path / "data")
    pred = write_jsonl(tmp_path / "p.jsonl", [{"id": "twitter-gmner-v2/dev/77", "answer": "None"},
                                              {"id": "twitter-gmner-v2/dev/78", "answer": "None"}])
    out = tmp_path / "e.json"
    res = invoke("--gold", str(gold), "--pred", str(pred), "-o", str(out))
    assert res.exit_code == 2, res.output
    assert "none of the 2 predictions matches one of the 3 gold records" in res.output
    assert "twitter-gmner-v2/dev/77" in res.output and "twitter-gmner-v2/test/1" in res.output
    assert not out.exists()
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    res = invoke("--gold", str(gold), "--pred", str(empty), "-o", str(out))
    assert res.exit_code == 2 and "no predictions were read" in res.output
