"""Ends a local Ray instance's processes when the driver that started them is gone, even after a SIGKILL.

Ray ties its head processes (GCS, raylet) to the driver that started them, but not everything below them: after a
``kill -9`` of the driver its dashboard agent and runtime-env agent live on, and so may workers for a few seconds. The
reaper is a small process of its own (plain Python, no imports beyond the standard library) started right after
``ray.init``. It is given the pids of the processes Ray started and follows their descendants (reading
``/proc/<pid>/task/<tid>/children`` once a second: a fraction of a millisecond for a run's tree, no scan of the machine).
It holds the read end of a pipe whose write end only the driver has: when the pipe reads end-of-file (the driver exited,
however it died), it kills every process it followed that is still the same process (pid and start time), and exits.
A driver that shuts Ray down normally sends ``reap`` first, so leftovers of a normal shutdown go too.

Linux only (``/proc``); elsewhere the runner does without it.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from pathlib import Path

POLL_S = 1.0


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat), or None when it is gone.
    With the pid it names one process for good: a pid can be reused, the pair cannot."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            out += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except (OSError, ValueError):
            continue
    return out


def follow(tracked: dict[int, str]) -> None:
    """Add the living descendants of the tracked processes (in place)."""
    todo = list(tracked)
    while todo:
        for child in children(todo.pop()):
            if child not in tracked and (started := start_time(child)) is not None:
                tracked[child] = started
                todo.append(child)


def workers_of(raylets: set[int]) -> dict[int, str]:
    """Processes whose environment names one of ``raylets`` as their raylet (``RAY_RAYLET_PID``): Ray workers forked
    after the last look at the tree (their raylet may already be gone, so they are no one's children any more)."""
    wanted = {f"RAY_RAYLET_PID={pid}".encode() for pid in raylets}
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if wanted.intersection(env) and (started := start_time(int(entry))) is not None:
            found[int(entry)] = started
    return found


def reap(tracked: dict[int, str]) -> int:
    """SIGKILL every tracked process that is still the same process, and the Ray workers of tracked raylets; returns
    how many were killed."""
    follow(tracked)
    tracked.update(workers_of(set(tracked)))
    killed = 0
    for pid, started in tracked.items():
        if pid != os.getpid() and start_time(pid) == started:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except OSError:
                pass
    return killed


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C to the terminal is the driver's to handle
    tracked = {pid: s for pid in map(int, argv) if (s := start_time(pid)) is not None}
    fd = sys.stdin.fileno()
    while True:
        follow(tracked)
        ready, _, _ = select.select([fd], [], [], POLL_S)
        if not ready:
            continue
        data = os.read(fd, 64)
        if not data or b"reap" in data:  # end-of-file: the driver is gone
            reap(tracked)
            return 0
        if b"exit" in data:
            return 0


class Reaper:
    """The driver's handle: ``Reaper(pids)`` starts the process; ``close()`` reaps what a normal shutdown left."""

    def __init__(self, pids: list[int]):
        self.process = subprocess.Popen([sys.executable, "-I", "-S", __file__, *map(str, pids)],
                                        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, close_fds=True)

    def close(self, timeout_s: float = 5.0) -> None:
        if self.process.poll() is None and self.process.stdin is not None:
            try:
                self.process.stdin.write(b"reap\n")
                self.process.stdin.close()
            except OSError:
                pass
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def supported() -> bool:
    return sys.platform.startswith("linux") and Path("/proc/self/task").is_dir()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
