"""Stuck work and orphaned processes, without Ray: the watchdog's decisions on the driver's clock, the in-process
executor's deadline between batches, a worker's check of its driver's lock before it commits, and the reaper that
ends what a SIGKILLed driver started. (With Ray: tests/integration/test_runner.py.)"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from gmner_pipeline.local_executor import DeadlineBeat
from gmner_pipeline.output_lock import DriverGone, OutputLock, RunLockedError, driver_alive
from gmner_pipeline.reaper import start_time, supported
from gmner_pipeline.scheduler import ShardTask, ShardTimeout, Watchdog
from gmner_pipeline.schema import empty_record
from gmner_pipeline.shards import beat_path, is_committed, shard_path, write_records
from gmner_pipeline.stage import StageContext
from gmner_pipeline.stages.passthrough import PassthroughConfig, PassthroughStage
from gmner_pipeline.worker import ShardProcessor


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_watchdog_times_out_on_its_own_clock_and_ignores_queued_shards(tmp_path):
    clock = Clock()
    dog = Watchdog(shard_timeout_s=100, stall_timeout_s=10, clock=clock)
    running, queued = ShardTask(0, 1, "in", str(tmp_path)), ShardTask(0, 2, "in", str(tmp_path))
    beat = beat_path(tmp_path, 1)
    beat.write_bytes(b"")
    assert dog.stuck([running, queued]) == []  # first sight: the clock starts now; shard 2 has not started
    for step in range(1, 5):  # progress every 9 s: never stalled
        clock.now = 9.0 * step
        os.utime(beat, ns=(step * 10**9, step * 10**9))
        assert dog.stuck([running, queued]) == []
    clock.now = 36 + 10.5  # no beat for 10.5 s
    (task, why), = dog.stuck([running, queued])
    assert task == running and "stall_timeout_s=10" in why
    clock.now = 101
    os.utime(beat, ns=(99 * 10**9, 99 * 10**9))
    (task, why), = dog.stuck([running])
    assert "shard_timeout_s=100" in why
    dog.forget(running)
    assert dog.stuck([running]) == []  # a new attempt starts its clocks again
    assert not Watchdog(None, None).active


def test_an_in_process_shard_is_ended_at_a_batch_boundary(tmp_path):
    task = ShardTask(0, 0, "in", str(tmp_path))
    beat = DeadlineBeat(task, None, shard_timeout_s=None, stall_timeout_s=0.05)
    beat.start()
    beat()  # quick: fine
    time.sleep(0.1)
    with pytest.raises(ShardTimeout, match="stall_timeout_s"):
        beat()


def test_a_worker_does_not_commit_once_its_driver_is_gone(tmp_path):
    out = tmp_path / "out"
    write_records(shard_path(tmp_path / "in", 0), [empty_record(id=f"r{i}", source="t") for i in range(3)])
    lock = OutputLock(out)
    with lock:
        assert driver_alive(lock.path) is True
        context = StageContext(output_dir=str(out), lock_file=str(lock.path))
        worker = ShardProcessor(PassthroughStage, PassthroughConfig(), context)
        worker.process(0, shard_path(tmp_path / "in", 0), out / "s")
        assert is_committed(out / "s", 0)
    assert driver_alive(lock.path) is False  # released (a killed driver releases it too: the OS does)
    with pytest.raises(DriverGone):
        worker.process(1, shard_path(tmp_path / "in", 0), out / "s")
    assert not is_committed(out / "s", 1) and not beat_path(out / "s", 1).exists()


def test_a_second_run_on_the_folder_is_still_refused(tmp_path):
    with OutputLock(tmp_path, wait_s=0.2):
        with pytest.raises(RunLockedError, match="another gmner-pipeline run"):
            OutputLock(tmp_path, wait_s=0.2).__enter__()


DRIVER = textwrap.dedent("""
    import subprocess, sys, time
    from gmner_pipeline.reaper import Reaper
    # a "Ray" process that starts a daemon of its own, then dies with the driver (as the raylet does)
    head = subprocess.Popen([sys.executable, "-c",
        "import subprocess, sys, time; subprocess.Popen(['sleep', '300']); time.sleep(300)"])
    time.sleep(0.5)
    reaper = Reaper([head.pid])
    time.sleep(1.5)  # the reaper follows the head's children once a second
    print(head.pid, flush=True)
    time.sleep(300)
""")


@pytest.mark.skipif(not supported(), reason="the reaper reads /proc (Linux)")
def test_the_reaper_ends_what_a_sigkilled_driver_started(tmp_path):
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        head = int(driver.stdout.readline())
        children = [int(c) for c in open(f"/proc/{head}/task/{head}/children").read().split()]
        assert children and start_time(children[0]) is not None
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        deadline = time.monotonic() + 10
        while any(start_time(p) for p in (head, *children)) and time.monotonic() < deadline:
            time.sleep(0.1)
        alive = [p for p in (head, *children) if start_time(p) is not None and _not_zombie(p)]
        assert alive == []
    finally:
        os.killpg(driver.pid, signal.SIGKILL) if _group_alive(driver.pid) else None


def _not_zombie(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except OSError:
        return False


def test_only_workers_on_the_drivers_host_test_its_lock():
    from gmner_pipeline.worker import lock_to_check

    here = StageContext(lock_file="/out/.lock", driver_host=socket.gethostname())
    assert lock_to_check(here) == "/out/.lock"
    assert lock_to_check(StageContext(lock_file="/out/.lock", driver_host="another-node")) is None
    assert lock_to_check(StageContext()) is None  # run_stage and plain tests: nothing to check
