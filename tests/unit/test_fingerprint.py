"""The ingest key sees content edits that keep a file's size and modification time (cp -p, rsync -t), and a rerun
re-hashes only the files whose stat changed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import gmner_pipeline.fingerprint as fp
from conftest import write_gmner_dataset
from gmner_pipeline.config import load_config
from gmner_pipeline.plan import plan_run


def key(tmp_path: Path, data: Path, *sets: str) -> str:
    cfg = load_config(None, ["source.kind=twitter_gmner", f"source.path={data}", "pipeline=[passthrough]",
                             f"run.output_dir={tmp_path / 'out'}", *sets])
    return plan_run(cfg).ingest.key


def edit_keeping_size_and_mtime(path: Path, old: bytes, new: bytes) -> None:
    assert len(old) == len(new)
    st = path.stat()
    path.write_bytes(path.read_bytes().replace(old, new, 1))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # what cp -p / rsync -t leave behind
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)


@pytest.fixture
def data(tmp_path):
    root = write_gmner_dataset(tmp_path / "data", 6)
    (root / "images").mkdir()
    (root / "images" / "1000.jpg").write_bytes(b"\xff\xd8 fake jpeg one")
    return root


def test_an_edit_that_keeps_size_and_mtime_changes_the_key(tmp_path, data):
    before = key(tmp_path, data)
    edit_keeping_size_and_mtime(data / "txt" / "train.txt", b"Paris\tB-LOC", b"Paris\tB-ORG")
    assert key(tmp_path, data) != before
    before = key(tmp_path, data)
    edit_keeping_size_and_mtime(data / "xml" / "1000.xml", b"<xmin>10</xmin>", b"<xmin>12</xmin>")
    assert key(tmp_path, data) != before


def test_stat_mode_is_the_old_cheap_key_and_content_mode_covers_images(tmp_path, data):
    stat_before = key(tmp_path, data, "source.fingerprint=stat")
    edit_keeping_size_and_mtime(data / "txt" / "train.txt", b"Paris\tB-LOC", b"Paris\tB-ORG")
    assert key(tmp_path, data, "source.fingerprint=stat") == stat_before  # what stat alone cannot see

    images = [f"source.image_dir={data / 'images'}"]
    auto_before = key(tmp_path, data, *images)
    content_before = key(tmp_path, data, *images, "source.fingerprint=content")
    edit_keeping_size_and_mtime(data / "images" / "1000.jpg", b"one", b"two")
    assert key(tmp_path, data, *images) == auto_before  # auto only stats image folders (documented)
    assert key(tmp_path, data, *images, "source.fingerprint=content") != content_before


def test_touching_a_file_without_changing_it_keeps_the_key(tmp_path, data):
    before = key(tmp_path, data)
    st = (data / "txt" / "train.txt").stat()
    os.utime(data / "txt" / "train.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert key(tmp_path, data) == before


def test_a_rerun_rehashes_only_changed_files(tmp_path, data, monkeypatch):
    monkeypatch.setattr(fp, "RACY_NS", 0)  # files written a moment ago would otherwise never be memoised
    hashed: list[str] = []
    real = fp.file_digest
    monkeypatch.setattr(fp, "file_digest", lambda path: hashed.append(path) or real(path))
    key(tmp_path, data)
    assert len(hashed) == 1 + 2  # train.txt and the two XML files (every 3rd of 6 tweets)
    hashed.clear()
    key(tmp_path, data)
    assert hashed == []  # the memo answered: stat only
    edit_keeping_size_and_mtime(data / "xml" / "1003.xml", b"<xmin>10</xmin>", b"<xmin>11</xmin>")
    key(tmp_path, data)
    assert hashed == [str(data / "xml" / "1003.xml")]  # its ctime moved, so only it is read again


def test_a_racy_file_is_not_memoised(tmp_path, data, monkeypatch):
    hashed: list[str] = []
    real = fp.file_digest
    monkeypatch.setattr(fp, "file_digest", lambda path: hashed.append(path) or real(path))
    key(tmp_path, data)  # every file was written less than RACY_NS ago
    key(tmp_path, data)
    assert len(hashed) == 2 * 3


def test_a_damaged_memo_only_costs_a_rehash(tmp_path, data):
    before = key(tmp_path, data)
    (tmp_path / "out" / "cache").mkdir(parents=True, exist_ok=True)
    (tmp_path / "out" / "cache" / fp.MEMO_FILE).write_text("{not json")
    assert key(tmp_path, data) == before
