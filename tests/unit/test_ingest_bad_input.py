"""Bad input is isolated, never fatal: bad bytes, binary files, over-long lines, error-only blocks, boxes that make no
sense with or without the image size, and splits that yield nothing."""

from __future__ import annotations

import io
import os
import tracemalloc
from pathlib import Path

import pytest
from PIL import Image

from gmner_pipeline.config import load_config
from gmner_pipeline.ingest import check_source, read_source
from gmner_pipeline.ingest.conll import read_conll_blocks
from gmner_pipeline.ingest.text_conll import read_text_conll
from gmner_pipeline.ingest.twitter_gmner import read_twitter_gmner
from gmner_pipeline.ingest_step import EmptySplitError, run_ingest
from gmner_pipeline.plan import plan_run


def gmner(root: Path, splits: dict[str, bytes], xmls: dict[str, str] | None = None) -> Path:
    (root / "txt").mkdir(parents=True)
    (root / "xml").mkdir()
    for split, data in splits.items():
        (root / "txt" / f"{split}.txt").write_bytes(data)
    for key, text in (xmls or {}).items():
        (root / "xml" / f"{key}.xml").write_text(text, encoding="utf-8")
    return root


def source(root: Path, *sets: str):
    return load_config(None, ["source.kind=twitter_gmner", f"source.path={root}", *sets]).source


GOOD = b"IMGID:1\nAlice\tB-PER\nvisits\tO\n\nIMGID:2\nBob\tB-PER\n\n"


def test_one_bad_byte_is_an_error_on_its_record_with_file_and_line(tmp_path):
    root = gmner(tmp_path, {"train": b"IMGID:1\nAl\xffice\tB-PER\n\nIMGID:2\nBob\tB-PER\n"})
    bad, good = read_twitter_gmner(root, "train")
    assert bad["status"] == "error" and f"{root}/txt/train.txt:2: not valid UTF-8 (byte 0xff" in bad["error"]
    assert bad["tokens"] == ["Al\ufffdice"] and bad["entities"][0]["type"] == "PER"  # what could be read is kept
    assert good["status"] == "ok" and good["tokens"] == ["Bob"]


@pytest.mark.parametrize("data,needle", [
    (bytes(range(256)) * 40, "holds binary data (a NUL byte at offset 0)"),
    ("IMGID:1\nAlice\tB-PER\n".encode("utf-16"), "it is UTF-16 text"),
])
def test_a_binary_split_is_one_error_record_and_the_other_splits_are_kept(tmp_path, data, needle):
    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, format="PNG")
    root = gmner(tmp_path, {"train": GOOD, "dev": data, "test": png.getvalue()})
    recs = list(read_source(source(root, "source.splits=[train,dev,test]"), tmp_path))
    by_split = {s: [r for r in recs if r["split"] == s] for s in ("train", "dev", "test")}
    assert [r["status"] for r in by_split["train"]] == ["ok", "ok"]
    (dev,) = by_split["dev"]
    assert dev["status"] == "error" and needle in dev["error"] and f"{root}/txt/dev.txt" in dev["error"]
    (test,) = by_split["test"]
    assert test["status"] == "error" and "not a CoNLL text file" in test["error"]


def test_a_utf8_byte_order_mark_is_not_part_of_the_first_header(tmp_path):
    root = gmner(tmp_path, {"train": b"\xef\xbb\xbf" + GOOD})
    assert [r["status"] for r in read_twitter_gmner(root, "train")] == ["ok", "ok"]


def test_a_block_with_no_header_and_no_tokens_keeps_its_errors(tmp_path):
    root = gmner(tmp_path, {"train": b"justonecolumn\n\nIMGID:1\nAlice\tB-PER\n"})
    orphan, tweet = read_twitter_gmner(root, "train")
    assert orphan["status"] == "error" and orphan["tokens"] == []
    assert "train.txt:1: token line before any IMGID: header" in orphan["error"]
    assert "train.txt:1: expected 'token<TAB>label'" in orphan["error"]
    assert tweet["status"] == "ok"


def test_plain_conll_block_of_bad_lines_is_its_own_error_record(tmp_path):
    path = tmp_path / "x.conll"
    path.write_bytes(b"Obama B-person\n\nbroken\n\nGo O\nSpurs B-team\n")
    recs = list(read_text_conll(path, label_map={"person": "PER", "team": "ORG"}))
    assert [r["status"] for r in recs] == ["ok", "error", "ok"]
    assert f"{path}:3: expected 'token<TAB>label'" in recs[1]["error"]
    assert recs[2]["tokens"] == ["Go", "Spurs"]  # the bad line's error did not leak into the next sentence


def test_a_50_mb_token_is_refused_without_being_read_whole(tmp_path):
    token = b"x" * (50 * 1024 * 1024)
    root = gmner(tmp_path, {"train": b"IMGID:1\n" + token + b"\tO\nok\tO\n\nIMGID:2\nBob\tB-PER\n"})
    tracemalloc.start()
    try:
        first, second = read_twitter_gmner(root, "train")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024, f"the reader held {peak / 2**20:.0f} MiB: the line was read whole"
    assert first["status"] == "error" and "train.txt:2: line is longer than 65536 bytes" in first["error"]
    assert first["tokens"] == ["ok"] and second["status"] == "ok"
    # the limit is a setting
    src = source(root, f"source.max_line_bytes={len(token) + 100}")
    assert [r["status"] for r in read_source(src, tmp_path)] == ["ok", "ok"]


def voc(box, size: str = "") -> str:
    return (f"<annotation>\n{size}\n<object><name>Alice</name><bndbox><xmin>{box[0]}</xmin><ymin>{box[1]}</ymin>"
            f"<xmax>{box[2]}</xmax><ymax>{box[3]}</ymax></bndbox></object>\n</annotation>")


@pytest.mark.parametrize("box,size,needle", [
    ((-50, 1, 10, 10), "", "negative coordinate"),
    ((-50, 1, 10, 10), "<size><width>100</width><height>80</height></size>", "negative coordinate"),
    ((30, 1, 10, 10), "", "empty or inverted"),
    ((1, 1, 1e9, 10), "", "larger than any image"),
    (("nan", 1, 10, 10), "", "not a finite number"),
    ((1, 1, 10, 10), "<size><width>0</width><height>80</height></size>", "<width> 0 is not an image side"),
    ((1, 1, 10, 10), "<size><width>-5</width><height>80</height></size>", "<width> -5 is not an image side"),
])
def test_boxes_are_validated_with_or_without_the_size(tmp_path, box, size, needle):
    root = gmner(tmp_path, {"train": b"IMGID:1\nAlice\tB-PER\n\nIMGID:2\nBob\tB-PER\n"}, {"1": voc(box, size)})
    bad, good = read_twitter_gmner(root, "train")
    assert bad["status"] == "error" and needle in bad["error"] and f"{root}/xml/1.xml:" in bad["error"]
    assert good["status"] == "ok"
    if "image side" not in needle:  # a bad box is left out; a bad <size> marks the record (its boxes are fine)
        assert bad["entities"][0]["boxes"] == []


def test_without_size_in_the_xml_boxes_are_checked_against_the_image(tmp_path):
    root = gmner(tmp_path, {"train": b"IMGID:1\nAlice\tB-PER\n\nIMGID:2\nAlice\tB-PER\n"},
                 {"1": voc((1, 1, 60, 10)), "2": voc((1, 1, 30, 10))})
    (tmp_path / "img").mkdir()
    for key in ("1", "2"):
        Image.new("RGB", (40, 20)).save(tmp_path / "img" / f"{key}.jpg")
    outside, inside = read_twitter_gmner(root, "train", image_dir=tmp_path / "img")
    assert outside["status"] == "error" and "outside the 40x20 image" in outside["error"]
    assert inside["status"] == "ok" and inside["entities"][0]["boxes"] == [[1, 1, 30, 10]]
    assert (inside["image"]["width"], inside["image"]["height"]) == (40, 20)


def test_an_xml_too_large_to_be_an_annotation_is_an_error(tmp_path):
    root = gmner(tmp_path, {"train": b"IMGID:1\nAlice\tB-PER\n"}, {"1": voc((1, 1, 5, 5)) + " " * 2048})
    (rec,) = read_twitter_gmner(root, "train", max_xml_bytes=1024)
    assert rec["status"] == "error" and "more than source.max_xml_bytes=1024" in rec["error"]


def ingest(tmp_path: Path, root: Path, *sets: str) -> dict:
    cfg = load_config(None, ["source.kind=twitter_gmner", f"source.path={root}", "pipeline=[passthrough]",
                             f"run.output_dir={tmp_path / 'out'}", *sets])
    return run_ingest(plan_run(cfg).ingest, cfg.source, tmp_path / "out" / "cache", "run-1")


def test_a_split_that_yields_no_records_is_a_warning_or_with_the_flag_an_error(tmp_path):
    root = gmner(tmp_path / "data", {"train": GOOD, "dev": b"\n\n"})
    summary = ingest(tmp_path, root, "source.splits=[train,dev]")
    assert summary["records_in"] == 2 and summary["records_by_split"] == {"train": 2}
    assert len(summary["warnings"]) == 1 and "split 'dev'" in summary["warnings"][0]
    with pytest.raises(EmptySplitError, match="split 'dev'.*source.empty_split=error"):
        ingest(tmp_path, root, "source.splits=[train,dev]", "source.empty_split=error")


def test_a_missing_split_is_reported_before_anything_is_read(tmp_path):
    root = gmner(tmp_path / "data", {"train": GOOD})
    with pytest.raises(FileNotFoundError, match=r"txt/dev.txt.*source.splits"):
        check_source(source(root, "source.splits=[train,dev]"))
    with pytest.raises(FileNotFoundError, match="image_dir"):
        check_source(source(root, f"source.image_dir={tmp_path / 'nope'}"))
    with pytest.raises(FileNotFoundError):
        ingest(tmp_path, root, "source.splits=[train,dev]")
    assert not list((tmp_path / "out").glob("ingest/*/shard-*"))  # nothing was written for the train split


def test_reading_blocks_never_raises_on_content(tmp_path):
    path = tmp_path / "mixed.txt"
    path.write_bytes(b"IMGID:1\n\x00\x01\tO\n" + b"a\tO\n" * 3 + b"IMGID:2\n\xc3\tB-PER\n")
    blocks = list(read_conll_blocks(path, header_prefix="IMGID:"))
    assert len(blocks) == 1 and "not a CoNLL text file" in blocks[0].errors[0]  # NUL in the first 8 KiB
    path.write_bytes(b"IMGID:1\n" + b"a\tO\n" * 3000 + b"b\x00c\tO\n")  # a NUL past the first 8 KiB
    (block,) = read_conll_blocks(path, header_prefix="IMGID:")
    assert len(block.tokens) == 3000 and "holds a NUL byte" in block.errors[0]
    assert os.path.getsize(path) > 8192
