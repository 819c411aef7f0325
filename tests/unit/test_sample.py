"""The bundled sample: ingests with zero errors offline, photos materialise atomically and idempotently, boxes fit."""

from __future__ import annotations

import shutil
import socket
from collections import Counter

import pytest
from PIL import Image

from gmner_pipeline.config import SampleSource
from gmner_pipeline.ingest import read_source
from gmner_pipeline.ingest import sample as sample_mod
from gmner_pipeline.ingest.sample import IMAGE_SUBDIR, SAMPLE_DIR, read_sample, sample_photos
from gmner_pipeline.stages.template_cot import TemplateCoTConfig, TemplateCoTStage


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def records(cache):
    # offline: any attempt to open a network connection fails the ingest (the photos must ship in the wheels)
    mp = pytest.MonkeyPatch()

    def no_network(*args, **kwargs):
        raise AssertionError("the bundled sample tried to use the network")

    mp.setattr(socket.socket, "connect", no_network)
    mp.setattr(socket, "create_connection", no_network)
    try:
        return list(read_sample(cache))
    finally:
        mp.undo()


def test_sample_ingests_with_zero_errors(records):
    assert len(records) == len(sample_photos()) == 10
    assert [r["error"] for r in records if r["status"] != "ok"] == []
    assert len({r["id"] for r in records}) == 10
    assert all(r["id"].startswith("gmner-sample/train/") and r["grounding_labels"] == "present" for r in records)


def test_sample_covers_the_cases_a_user_needs(records):
    entities = [e for r in records for e in r["entities"]]
    assert set(Counter(e["type"] for e in entities)) == {"PER", "LOC", "ORG", "OTHER"}
    assert any(e["boxes"] for e in entities) and any(not e["boxes"] for e in entities)  # visible and not visible
    assert any(not r["entities"] for r in records)  # a tweet without entities
    assert any(r["entities"] and all(not e["boxes"] for e in r["entities"]) for r in records)  # nothing groundable


def test_images_materialise_and_match_the_annotations(records, cache):
    for rec in records:
        path = cache / IMAGE_SUBDIR / f"{rec['sample_key']}.png"
        assert rec["image"]["path"] == str(path) and rec["image"]["sha256"]
        with Image.open(path) as im:
            assert im.mode == "RGB" and im.size == (rec["image"]["width"], rec["image"]["height"])
    leftovers = [p.name for p in (cache / IMAGE_SUBDIR).iterdir() if p.suffix != ".png"]
    assert leftovers == [sample_mod.STAMP_FILE]  # no temp files left behind


def test_boxes_lie_inside_their_images(records):
    for rec in records:
        w, h = rec["image"]["width"], rec["image"]["height"]
        for ent in rec["entities"]:
            for x1, y1, x2, y2 in ent["boxes"]:
                assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h, (rec["id"], ent["text"])


def test_materialising_is_idempotent(records, cache):
    before = {p.name: p.stat().st_mtime_ns for p in (cache / IMAGE_SUBDIR).iterdir()}
    again = list(read_sample(cache))
    after = {p.name: p.stat().st_mtime_ns for p in (cache / IMAGE_SUBDIR).iterdir()}
    assert before == after
    assert [r["image"]["sha256"] for r in again] == [r["image"]["sha256"] for r in records]


def test_limit_and_dispatcher(cache):
    assert len(list(read_sample(cache, limit=3))) == 3
    recs = list(read_source(SampleSource(name="demo"), cache))
    assert len(recs) == 10 and recs[0]["source"] == "demo"


def test_missing_photo_is_an_error_on_its_records_not_a_crash(records, cache, tmp_path, monkeypatch):
    (tmp_path / IMAGE_SUBDIR).mkdir()
    for png in (cache / IMAGE_SUBDIR).glob("*.png"):  # reuse the other photos: only the rocket is materialised
        if not png.name.startswith("rocket"):
            shutil.copy(png, tmp_path / IMAGE_SUBDIR / png.name)

    def unavailable(spec):
        raise RuntimeError(f"{spec} unavailable")

    monkeypatch.setattr(sample_mod, "load_photo", unavailable)
    recs = list(read_sample(tmp_path, limit=2))  # astronaut, rocket
    assert recs[0]["status"] == "ok"
    assert recs[1]["status"] == "error" and "IMGID:rocket" in recs[1]["error"]


def test_annotations_ship_with_the_package():
    assert (SAMPLE_DIR / "txt" / "train.txt").is_file() and (SAMPLE_DIR / "LICENSES.md").is_file()
    assert {p.stem for p in (SAMPLE_DIR / "xml").glob("*.xml")} == set(sample_photos())


def test_template_cot_on_the_sample_is_consistent(records):
    out = TemplateCoTStage(TemplateCoTConfig())([dict(r) for r in records])
    assert all(c["consistent"] for r in out for c in r["cot"]["chains"])
    assert sum(len(r["cot"]["chains"]) for r in out) == 20


def test_horse_silhouette_is_black_on_white(records, cache):
    with Image.open(cache / IMAGE_SUBDIR / "horse.png") as im:
        assert im.getpixel((0, 0)) == (255, 255, 255) and im.getpixel((150, 150)) == (0, 0, 0)


def test_images_from_an_older_rendering_are_redrawn(records, cache, tmp_path):
    image_dir = tmp_path / IMAGE_SUBDIR
    image_dir.mkdir()
    Image.new("RGB", (4, 4)).save(image_dir / "horse.png")  # a stale cache without a stamp
    recs = {r["sample_key"]: r for r in read_sample(tmp_path)}
    assert recs["horse"]["status"] == "ok" and recs["horse"]["image"]["width"] == 400
    assert (image_dir / sample_mod.STAMP_FILE).read_text() == sample_mod.render_stamp()
