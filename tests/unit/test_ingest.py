import re
from pathlib import Path

import pytest
from PIL import Image

from conftest import GMNER_V2, needs_shared, write_gmner_dataset
from gmner_pipeline.ingest.conll import bio_spans
from gmner_pipeline.ingest.text_conll import map_label, read_text_conll
from gmner_pipeline.ingest.twitter_gmner import read_twitter_gmner


def voc(objects, w=100, h=80):
    objs = "".join(f"<object><name>{n}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax>"
                   f"<ymax>{b[3]}</ymax></bndbox></object>" for n, b in objects)
    return f"<annotation>\n<size><width>{w}</width><height>{h}</height></size>\n{objs}\n</annotation>"


def make(root: Path, tweets: dict[str, list[str]], xmls: dict[str, str]) -> Path:
    (root / "txt").mkdir(parents=True)
    (root / "xml").mkdir()
    lines = []
    for key, toks in tweets.items():
        lines += [f"IMGID:{key}", *toks, ""]
    (root / "txt" / "train.txt").write_text("\n".join(lines), encoding="utf-8")
    for key, text in xmls.items():
        (root / "xml" / f"{key}.xml").write_text(text, encoding="utf-8")
    return root


def test_entities_boxes_and_visibility(tmp_path):
    root = make(tmp_path, {"1": ["Alice\tB-PER", "Smith\tI-PER", "in\tO", "Paris\tB-LOC"]},
                {"1": voc([("Alice Smith", (1, 2, 30, 40)), ("Alice Smith", (40, 2, 60, 40))])})
    (rec,) = read_twitter_gmner(root, "train", source="t")
    assert rec["status"] == "ok" and rec["id"] == "t/train/1"
    assert rec["grounding_labels"] == "present"
    alice, paris = rec["entities"]
    assert (alice["text"], alice["type"], alice["start"], alice["end"]) == ("Alice Smith", "PER", 0, 2)
    assert alice["boxes"] == [[1, 2, 30, 40], [40, 2, 60, 40]]
    assert paris["boxes"] == []  # no object: not visible
    assert (rec["image"]["width"], rec["image"]["height"]) == (100, 80)  # from the XML, no image folder


@pytest.mark.parametrize("tokens,xml,needle", [
    (["Alice\tI-PER", "x\tO"], None, "does not continue"),
    (["Alice\tB-PER", "x\tWEIRD"], None, "is not O, B-X or I-X"),
    (["Alice\tB-PER", "justonecolumn"], None, "expected 'token<TAB>label'"),
    (["Alice\tB-PER"], voc([("Alice", (10, 10, 500, 40))]), "outside the 100x80 image"),
    (["Alice\tB-PER"], voc([("Bob", (10, 10, 20, 40))]), "matches no entity"),
    (["Alice\tB-PER"], "<annotation><size>", "not well-formed XML"),
])
def test_bad_input_is_an_error_on_the_record_naming_file_and_line(tmp_path, tokens, xml, needle):
    root = make(tmp_path, {"1": tokens, "2": ["Bob\tB-PER"]}, {"1": xml} if xml else {})
    first, second = read_twitter_gmner(root, "train")
    assert first["status"] == "error" and needle in first["error"]
    assert str(root) in first["error"] and first["error_stage"] == "ingest"
    assert re.search(r"\.(txt|xml):\d+: ", first["error"])  # file:line
    assert first["entities"] or first["tokens"]  # the record keeps what could be read
    assert second["status"] == "ok"  # the run goes on


def test_images_missing_corrupt_and_good(tmp_path):
    root = make(tmp_path, {"1": ["a\tO"], "2": ["b\tO"], "3": ["c\tO"]}, {"3": voc([], w=20, h=10)})
    images = tmp_path / "img"
    images.mkdir()
    (images / "2.jpg").write_bytes(b"not an image at all")
    Image.new("RGB", (20, 10)).save(images / "3.jpg")
    missing, corrupt, good = read_twitter_gmner(root, "train", image_dir=images)
    assert missing["status"] == "error" and "not found" in missing["error"]
    assert corrupt["status"] == "error" and "not a readable image" in corrupt["error"]
    assert good["status"] == "ok" and good["image"]["sha256"] and good["image"]["width"] == 20


def test_repeated_imgid_stays_distinct(tmp_path):
    root = make(tmp_path, {"1": ["a\tO"]}, {})
    text = (root / "txt" / "train.txt").read_text()
    (root / "txt" / "train.txt").write_text(text + "\n" + text)
    ids = [r["id"] for r in read_twitter_gmner(root, "train")]
    assert ids == ["twitter-gmner-v2/train/1", "twitter-gmner-v2/train/1#2"]


def test_bio_spans_tolerates_bioes_and_reports_orphans():
    spans, errors = bio_spans(["S-PER", "O", "B-LOC", "E-LOC", "I-ORG"])
    assert [(s.start, s.end, s.label) for s in spans] == [(0, 1, "PER"), (2, 4, "LOC"), (4, 5, "ORG")]
    assert len(errors) == 1 and "I-ORG" in errors[0]


def test_text_conll_with_label_map(tmp_path):
    path = tmp_path / "wnut.conll"
    path.write_text("Obama B-person\nvisits O\nthe O\nEiffel B-facility\nTower I-facility\n\n"
                    "Go O\nSpurs B-sportsteam\n\nx B-unknowntype\n", encoding="utf-8")
    label_map = {"person": "PER", "facility": "LOC", "sportsteam": "ORG"}
    recs = list(read_text_conll(path, label_map=label_map, source="wnut"))
    assert [r["status"] for r in recs] == ["ok", "ok", "ok"]
    assert [(e["text"], e["type"], e["fine_type"]) for e in recs[0]["entities"]] == [
        ("Obama", "PER", "person"), ("Eiffel Tower", "LOC", "facility")]
    assert recs[0]["grounding_labels"] == "absent" and recs[0]["image"] is None
    assert recs[2]["entities"] == []  # unmapped label dropped when not strict
    strict = list(read_text_conll(path, label_map=label_map, strict_labels=True))
    assert strict[2]["status"] == "error" and "not in label_map" in strict[2]["error"]
    assert map_label("person-actor", {"person": "PER"}) == "PER"


@needs_shared(GMNER_V2)
@pytest.mark.shared_data
def test_twitter_gmner_v2_counts():
    expected = {"train": (7000, 11779), "dev": (1500, 2450), "test": (1500, 2543)}
    for split, (tweets, entities) in expected.items():
        recs = list(read_twitter_gmner(GMNER_V2, split))
        ents = [e for r in recs for e in r["entities"]]
        assert (len(recs), len(ents)) == (tweets, entities)
        assert all(r["status"] == "ok" for r in recs)
        if split == "test":
            assert sum(1 for e in ents if e["boxes"]) == 1046
            assert sum(len(e["boxes"]) for e in ents) == 1254


def test_synthetic_dataset_helper(tmp_path):
    root = write_gmner_dataset(tmp_path, 5)
    assert len(list(read_twitter_gmner(root, "train"))) == 5


def test_relative_image_dir_gives_absolute_image_paths(tmp_path, monkeypatch):
    # Records travel to actors on other nodes (and to later runs from elsewhere): their image paths must be absolute.
    root = make(tmp_path, {"3": ["c\tO"]}, {"3": voc([], w=20, h=10)})
    (tmp_path / "img").mkdir()
    Image.new("RGB", (20, 10)).save(tmp_path / "img" / "3.jpg")
    monkeypatch.chdir(tmp_path)
    (rec,) = read_twitter_gmner(root, "train", image_dir="img")
    assert rec["status"] == "ok" and rec["image"]["path"] == str(tmp_path / "img" / "3.jpg")
