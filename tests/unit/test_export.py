"""``gmner-pipeline export``: every format read back gives the gold triples (boxes mapped back from the frame), the
user turn of the one student prompt builder and the image; a dev/test record is never exported."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from gmner_pipeline import student
from gmner_pipeline.answer import Triple, extract_answer, format_answer, format_turn, gold_triples, parse_answer
from gmner_pipeline.cli import app
from gmner_pipeline.export import ExportRefused, export_split
from gmner_pipeline.export.examples import prompt_config
from gmner_pipeline.frames import FrameConfig, from_frame
from gmner_pipeline.schema import empty_record, records_to_table

SIZES = [(640, 480), (333, 500), (1280, 720)]


def _record(i: int, image: Path, w: int, h: int, split: str = "train", dsplit: str = "D1") -> dict:
    tokens = ["Alice", "Smith", "visits", "Paris", "with", "NASA"]
    ents = [{"text": "Alice Smith", "start": 0, "end": 2, "type": "PER", "fine_type": None,
             "boxes": [[w * 0.1, h * 0.2, w * 0.5, h * 0.9]]},
            {"text": "Paris", "start": 3, "end": 4, "type": "LOC", "fine_type": None, "boxes": []},
            {"text": "NASA", "start": 5, "end": 6, "type": "ORG", "fine_type": None,
             "boxes": [[1, 2, w * 0.3, h * 0.3], [w * 0.6, h * 0.6, w - 1, h - 1]]}]
    rec = empty_record(id=f"t/{split}/{i}", source="t", split=split, sample_key=str(i), text=" ".join(tokens),
                       tokens=tokens, entities=ents, grounding_labels="present",
                       image={"path": str(image), "uri": None, "sha256": None, "width": w, "height": h})
    answer = format_answer(gold_triples(rec))
    think = f"Alice Smith is at {json.dumps(ents[0]['boxes'][0]).replace(' ', '')} in the photo."
    chain = {"style": "template", "route": "entity_first", "model_id": None, "seed": 0, "think": think,
             "answer": answer, "text": format_turn(think, answer), "consistent": True, "rejection": None,
             "attempts": 1}
    rec["cot"] = {"chains": [chain, dict(chain, route="constraint_first")], "split": dsplit, "skipped": None}
    return rec


@pytest.fixture
def published(tmp_path):
    out = tmp_path / "run"
    records = []
    for i, (w, h) in enumerate(SIZES):
        img = tmp_path / "images" / f"{i}.jpg"
        img.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (w, h), (i * 40, 100, 200)).save(img)
        records.append(_record(i, img, w, h))
    (out / "dataset" / "D1").mkdir(parents=True)
    pq.write_table(records_to_table(records), out / "dataset" / "D1" / "part-00000.parquet")
    return out, {r["id"]: r for r in records}


def _read(fmt: str, target: Path) -> list[tuple[str, str, str, str | None]]:
    """(example id, user text, assistant turn, image file) per exported example."""
    rows = []
    if fmt == "swift":
        for line in (target / "D1.jsonl").read_text().splitlines():
            row = json.loads(line)
            user, assistant = [m["content"] for m in row["messages"]]
            rows.append((row["id"], user, assistant, row["images"][0]))
    elif fmt == "sharegpt":
        info = json.loads((target / "dataset_info.json").read_text())["gmner_D1"]
        assert info["formatting"] == "sharegpt" and info["columns"]["images"] == "images"
        for row in json.loads((target / info["file_name"]).read_text()):
            human, gpt = row["conversations"]
            assert (human["from"], gpt["from"]) == ("human", "gpt")
            rows.append((row["id"], human["value"], gpt["value"], row["images"][0]))
    elif fmt == "jsonl":
        for line in (target / "D1.jsonl").read_text().splitlines():
            row = json.loads(line)
            user, assistant = row["messages"]
            text = "<image>" + next(p["text"] for p in user["content"] if p["type"] == "text")
            rows.append((row["id"], text, assistant["content"], row["images"][0]))
    else:
        import datasets

        ds = datasets.load_dataset(str(target), cache_dir=str(target.parent / "hf-cache"))["D1"]
        for row in ds:
            user, assistant = [m["content"] for m in row["messages"]]
            img = row["images"][0]
            path = target.parent / f"decoded-{row['id'].replace('/', '_')}.png"
            img.save(path)
            rows.append((row["id"], user, assistant, str(path)))
    return rows


@pytest.mark.parametrize("fmt", ["swift", "sharegpt", "jsonl", "hf"])
@pytest.mark.parametrize("frame", ["original", "qwen2_5_vl", "qwen2_vl"])
def test_round_trip_gives_the_gold_triples_back(published, tmp_path, fmt, frame, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out, records = published
    target = tmp_path / f"export-{fmt}-{frame}"
    images = "copy" if frame == "qwen2_vl" else "relative"
    stats = export_split(out, "D1", fmt, target, images=images, frame=frame)
    assert (stats.records, stats.examples) == (3, 6)
    rows = _read(fmt, target)
    assert len(rows) == 6
    prompt = prompt_config(frame)
    fc = FrameConfig(kind=frame)
    for ex_id, user, assistant, image in rows:
        rec = records[ex_id.split("#")[0]]
        w, h = rec["image"]["width"], rec["image"]["height"]
        assert user == "<image>" + student.user_text(rec, prompt)  # the one student prompt builder
        parsed = parse_answer(extract_answer(assistant))
        assert parsed.ok
        back = [Triple(t.entity, t.type, None if t.boxes is None else
                       tuple(from_frame(b, w, h, fc) for b in t.boxes)) for t in parsed.triples]
        gold = gold_triples(rec)
        assert [(t.entity, t.type, t.boxes is None) for t in back] == [(t.entity, t.type, t.boxes is None)
                                                                       for t in gold]
        unit = max(w / 1000, h / 1000) if frame == "qwen2_vl" else max(w, h) / 400  # one frame unit, rounded
        for got, want in zip(back, gold):
            for gb, wb in zip(got.boxes or (), want.boxes or ()):
                assert max(abs(a - b) for a, b in zip(gb, wb)) <= unit + 0.5, (frame, gb, wb)
        if frame == "original":
            assert "Alice Smith|PER|[64,96,320,432]" in assistant or w != 640
        file = Path(image) if os.path.isabs(image) else target / image
        with Image.open(file) as im, Image.open(rec["image"]["path"]) as orig:
            assert im.size == orig.size == (w, h)  # the original image, decoded


@pytest.mark.parametrize("heldout", ["test", "dev"])
def test_a_dev_or_test_record_in_a_training_split_is_never_exported(published, tmp_path, heldout):
    """The whole split is checked before anything is written: a held-out record in the last file of the split (after
    good records) leaves no file at all, in every format."""
    out, records = published
    leaked = _record(9, Path(next(iter(records.values()))["image"]["path"]), 640, 480, split=heldout)
    pq.write_table(records_to_table([leaked]), out / "dataset" / "D1" / "part-00001.parquet")
    for fmt in ("swift", "sharegpt", "jsonl", "hf"):
        with pytest.raises(ExportRefused, match=f"'t/{heldout}/9' of source split '{heldout}'"):
            export_split(out, "D1", fmt, tmp_path / f"x-{fmt}")
        assert not (tmp_path / f"x-{fmt}").exists()  # not even the good records before it
    if heldout == "dev":
        return
    res = CliRunner().invoke(app, ["export", str(out), "--split", "D1", "--format", "swift", "--to",
                                   str(tmp_path / "cli")])
    assert res.exit_code == 2 and "only ['train'] records may be exported" in res.output
    # a record of D2 inside the D1 folder is refused too
    (out / "dataset" / "D1" / "part-00001.parquet").unlink()
    other = _record(8, Path(leaked["image"]["path"]), 640, 480, dsplit="D2")
    pq.write_table(records_to_table([other]), out / "dataset" / "D1" / "part-00001.parquet")
    with pytest.raises(ExportRefused, match="does not belong to D1"):
        export_split(out, "D1", "jsonl", tmp_path / "y")


def test_missing_split_and_bad_options_are_explained(published, tmp_path):
    out, _ = published
    res = CliRunner().invoke(app, ["export", str(out), "--split", "D2", "-f", "swift", "--to", str(tmp_path / "z")])
    assert res.exit_code == 2 and "has no published D2 (published: D1)" in res.output
    assert not (tmp_path / "z").exists()
    res = CliRunner().invoke(app, ["export", str(out), "-f", "swift", "--to", str(tmp_path / "z"), "--frame", "x"])
    assert res.exit_code == 2 and "--frame 'x'" in res.output
    res = CliRunner().invoke(app, ["export", str(out), "-f", "csv", "--to", str(tmp_path / "z")])
    assert res.exit_code == 2 and "choose one of ['swift', 'sharegpt', 'hf', 'jsonl']" in res.output
