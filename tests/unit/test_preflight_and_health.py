"""Checks before a run (output folder, Ray address, values Ray refuses) and the error share after it."""

from __future__ import annotations

import socket
import threading

import pytest

from gmner_pipeline.config import ConfigError, load_config
from gmner_pipeline.health import error_share_problem
from gmner_pipeline.preflight import PreflightError, check_output_dir, check_ray_address, split_address
from gmner_pipeline.schema import empty_record
from gmner_pipeline.shards import commit_shard, shard_path, write_records
from gmner_pipeline.worker import shard_stats


def test_an_output_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(PreflightError, match="is a file, not a folder"):
        check_output_dir(tmp_path / "file")
    with pytest.raises(PreflightError, match="cannot be created: .*file is a file"):
        check_output_dir(tmp_path / "file" / "out")
    check_output_dir(tmp_path / "new" / "out")  # a folder that can be made is fine


@pytest.mark.parametrize("setting,needle", [
    ("run.num_cpus=-1", "run.num_cpus: Input should be greater than 0"),
    ("run.object_store_memory=1000", "run.object_store_memory: Input should be greater than or equal to 78643200"),
    ("run.max_error_share=1.5", "run.max_error_share"),
])
def test_values_ray_refuses_are_config_errors(setting, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, [setting])


def test_address_forms():
    assert split_address("10.0.0.1:6379") == ("10.0.0.1", 6379)
    assert split_address("ray://head:10001") == ("head", 10001)
    assert split_address("[::1]:6379") == ("::1", 6379)
    assert split_address("auto") is None and split_address("local") is None


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_nothing_listening_at_the_ray_address_fails_at_once_with_a_message():
    port = _closed_port()
    with pytest.raises(PreflightError, match=rf"cannot reach the Ray cluster at 127.0.0.1:{port}: nothing listens"):
        check_ray_address(f"127.0.0.1:{port}", timeout_s=5)
    with pytest.raises(PreflightError, match="does not resolve"):
        check_ray_address("no-such-host.invalid:6379", timeout_s=5)


def test_a_port_that_answers_but_is_not_ray_is_refused_within_the_timeout():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]

    def answer_like_http() -> None:
        conn, _ = server.accept()
        conn.recv(64)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        conn.close()

    threading.Thread(target=answer_like_http, daemon=True).start()
    try:
        with pytest.raises(PreflightError, match="not a Ray head node"):
            check_ray_address(f"127.0.0.1:{port}", timeout_s=5)
    finally:
        server.close()

    silent = socket.socket()  # accepts the connection (backlog) but never answers: bounded by the timeout
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    try:
        with pytest.raises(PreflightError, match="no answer within 0.5 s"):
            check_ray_address(f"127.0.0.1:{silent.getsockname()[1]}", timeout_s=0.5)
    finally:
        silent.close()


def _stage_dir(tmp_path, statuses: list[str]):
    recs = [empty_record(id=f"s/train/{i}", source="s") for i in range(len(statuses))]
    for rec, status in zip(recs, statuses):
        if status == "error":
            rec.update(status="error", error=f"image for IMGID:{rec['id']} not found", error_stage="ingest")
    write_records(shard_path(tmp_path, 0), recs)
    commit_shard(tmp_path, 0, shard_stats(recs, "ingest"))
    return tmp_path


def test_the_error_share_fails_a_run_with_the_first_error_as_its_reason(tmp_path):
    stage = _stage_dir(tmp_path, ["ok", "error", "error", "error"])
    problem = error_share_problem(stage, 0.5)
    assert problem and "3 of 4 records (75%) ended in error" in problem and "run.max_error_share=0.5" in problem
    assert "ingest: 3" in problem and "first error: [ingest] image for IMGID:s/train/1 not found" in problem
    assert error_share_problem(stage, 0.75) is None  # at the limit is allowed
    assert error_share_problem(stage, 1.0) is None


def test_an_empty_stage_has_no_error_share(tmp_path):
    assert error_share_problem(tmp_path, 0.0) is None
