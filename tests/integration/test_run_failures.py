"""Runs that cannot succeed say so: one line, the reason, a non-zero exit code, never a traceback.

Exit codes: 2 when the run cannot start or the driver cannot go on (config, output folder, disk, Ray), 1 when it ran
but its output is not worth keeping (failed shards, too many records in error)."""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import write_gmner_dataset
from gmner_pipeline.cli import app

pytestmark = pytest.mark.integration
cli = CliRunner()


def run_args(data: Path, out: Path, *sets: str) -> list[str]:
    args = ["run", "--output", str(out), "--set", "source.kind=twitter_gmner", "--set", f"source.path={data}",
            "--set", "run.shard_size=4", "--set", "run.progress=false", "--set", "pipeline=[passthrough]"]
    for item in sets:
        args += ["--set", item]
    return args


def one_line_error(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


def test_a_run_where_every_record_fails_exits_non_zero_with_the_reason(tmp_path, ray_local):
    data = write_gmner_dataset(tmp_path / "data", 10)
    (tmp_path / "images").mkdir()  # the folder exists, but none of the images are in it
    args = run_args(data, tmp_path / "out", f"source.image_dir={tmp_path / 'images'}")
    result = cli.invoke(app, args)
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "run failed: 10 of 10 records (100%) ended in error" in text
    assert "first error: [ingest] image for IMGID:1000 not found" in text
    # a user who accepts errors says so
    allowed = cli.invoke(app, args + ["--set", "run.max_error_share=1"])
    assert allowed.exit_code == 0, allowed.output


def test_a_missing_image_folder_is_refused_before_the_run(tmp_path):
    data = write_gmner_dataset(tmp_path / "data", 4)
    line = one_line_error(cli.invoke(app, run_args(data, tmp_path / "out", f"source.image_dir={tmp_path / 'nope'}")))
    assert "source.image_dir=" in line and "is not a folder" in line


def test_an_output_path_that_is_a_file_exits_2_with_one_line(tmp_path):
    data = write_gmner_dataset(tmp_path / "data", 4)
    (tmp_path / "out").write_text("not a folder")
    line = one_line_error(cli.invoke(app, run_args(data, tmp_path / "out")))
    assert "is a file, not a folder" in line


@pytest.mark.parametrize("setting,needle", [
    ("run.num_cpus=-1", "greater than 0"),
    ("run.object_store_memory=1000", "78643200"),
])
def test_values_ray_refuses_exit_2_before_ray_starts(tmp_path, setting, needle):
    data = write_gmner_dataset(tmp_path / "data", 4)
    result = cli.invoke(app, run_args(data, tmp_path / "out", setting))
    assert result.exit_code == 2 and needle in result.output and "Traceback" not in result.output


def test_an_unreachable_ray_address_fails_with_a_message(tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = write_gmner_dataset(tmp_path / "data", 4)
    line = one_line_error(cli.invoke(app, run_args(data, tmp_path / "out") + ["--address", f"127.0.0.1:{port}"]))
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port}: nothing listens" in line
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")  # the same check applies to the environment variable
    assert "cannot reach the Ray cluster" in one_line_error(cli.invoke(app, run_args(data, tmp_path / "out2")))


@pytest.fixture(params=["tmpfs", "patched"])
def full_disk(request, tmp_path, monkeypatch):
    """An output folder on a disk that fills up during ingest: a real 160 KiB tmpfs where we may mount one (root),
    else the Parquet writer patched to fail like a full disk."""
    mount = tmp_path / "small"
    mount.mkdir()
    if request.param == "tmpfs":
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mount)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        yield mount
        subprocess.run(["umount", "-l", str(mount)], check=False)
        return
    import gmner_pipeline.shards as shards

    real = shards.pq.write_table
    calls = {"n": 0}

    def write_table(table, where, **kw):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(table, where, **kw)

    monkeypatch.setattr(shards.pq, "write_table", write_table)
    yield mount


def test_disk_full_during_ingest_exits_2_with_one_line_and_keeps_what_was_committed(tmp_path, full_disk):
    data = write_gmner_dataset(tmp_path / "data", 2000)
    out = full_disk / "out"
    args = run_args(data, out, "run.shard_size=50")
    line = one_line_error(cli.invoke(app, args))
    assert "No space left on device while writing" in line and "rerun the same command" in line
    ingest_dir = next((out / "ingest").iterdir())
    assert not [p for p in ingest_dir.iterdir() if ".tmp-" in p.name]  # no half-written file left behind
    assert len(list(ingest_dir.glob("shard-*.done.json"))) >= 1


def test_an_empty_split_is_a_warning_or_with_the_flag_exit_2(tmp_path, ray_local):
    data = write_gmner_dataset(tmp_path / "data", 4)
    (data / "txt" / "dev.txt").write_text("\n")
    result = cli.invoke(app, run_args(data, tmp_path / "out", "source.splits=[train,dev]"))
    assert result.exit_code == 0, result.output
    assert "warning: split 'dev' of source 'twitter-gmner-v2' yielded no records" in " ".join(result.output.split())
    strict = cli.invoke(app, run_args(data, tmp_path / "out2", "source.splits=[train,dev]",
                                      "source.empty_split=error"))
    assert "split 'dev'" in one_line_error(strict)
