"""Shared by the runner and memory benchmarks: a Twitter-GMNER source of any size, and peak RSS per process.

``replicate_gmner(src, dst, n)`` writes ``dst/txt/train.txt`` with the first ``n`` tweets of ``src``'s train split
repeated (each copy keeps its IMGID, so the reader gives it a new id ``<IMGID>#<copy>`` and it still finds its XML
boxes) and links ``dst/xml`` to ``src/xml``: a 100k-record source costs one 14 MB text file. Without the real data,
``synthetic_gmner`` writes a source of the same layout.

``TreeSampler`` polls a process and all its descendants (the CLI driver, Ray's GCS/raylet/agents, the stage actors)
and keeps each one's peak RSS (``VmHWM`` from /proc, so a peak between two polls is not missed).
"""

from __future__ import annotations

import os
import re
import threading
from collections import defaultdict
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
# $GMNER_DATA, else ../shared beside the checkout (or beside the worktrees folder)
DEFAULT_DATA = next((p for p in (Path(os.environ.get("GMNER_DATA", "/nonexistent")),
                                 REPO.parent / "shared" / "data" / "twitter-gmner-v2",
                                 REPO.parent.parent / "shared" / "data" / "twitter-gmner-v2") if p.is_dir()), None)


def _blocks(text: str) -> list[str]:
    return [b.strip("\n") for b in re.split(r"\n(?=IMGID:)", text) if b.strip()]


def replicate_gmner(src: Path, dst: Path, n: int) -> Path:
    """A Twitter-GMNER folder with ``n`` train tweets made from ``src``'s train split (see module doc)."""
    blocks = _blocks((src / "txt" / "train.txt").read_text(encoding="utf-8"))
    (dst / "txt").mkdir(parents=True, exist_ok=True)
    with open(dst / "txt" / "train.txt", "w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(blocks[i % len(blocks)] + "\n\n")
    xml = dst / "xml"
    if not xml.exists():
        xml.symlink_to((src / "xml").resolve(), target_is_directory=True)
    return dst


def synthetic_gmner(dst: Path, n: int) -> Path:
    """The layout without the real data: tweets with two entities, every third one with a box."""
    (dst / "txt").mkdir(parents=True, exist_ok=True)
    (dst / "xml").mkdir(parents=True, exist_ok=True)
    with open(dst / "txt" / "train.txt", "w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(f"IMGID:{i}\nAlice\tB-PER\nSmith\tI-PER\nvisits\tO\nParis\tB-LOC\ntoday\tO\n\n")
            if i % 3 == 0 and i < 5000:
                (dst / "xml" / f"{i}.xml").write_text(
                    "<annotation><size><width>100</width><height>80</height></size><object><name>Alice Smith</name>"
                    "<bndbox><xmin>10</xmin><ymin>5</ymin><xmax>50</xmax><ymax>70</ymax></bndbox></object>"
                    "</annotation>", encoding="utf-8")
    return dst


def source_of_size(dst: Path, n: int, data: Path | None = DEFAULT_DATA) -> tuple[Path, str]:
    """(folder, description): the real train split replicated when ``data`` exists, else a synthetic source."""
    if data is not None and (data / "txt" / "train.txt").is_file():
        return replicate_gmner(data, dst, n), f"Twitter-GMNER v2 train replicated to {n}"
    return synthetic_gmner(dst, n), f"synthetic Twitter-GMNER layout, {n} tweets"


def process_kind(proc: psutil.Process) -> str:
    """A short name for what a process is in a run: gcs_server, raylet, a stage actor, an idle worker, ..."""
    try:
        name = proc.name()
        cmd = proc.cmdline()
    except psutil.Error:
        return "gone"
    if name in ("gcs_server", "raylet"):
        return name
    title = " ".join(cmd)
    if title.startswith("ray::"):  # a Ray worker names itself after what it runs: ray::IDLE, ray::ShardActor.process
        what = title.split()[0].split(".")[0]
        return "actor:ShardActor" if what == "ray::ShardActor" else what
    for script in ("default_worker.py", "dashboard_agent", "runtime_env_agent", "log_monitor", "monitor.py",
                   "dashboard.py", "ray_client_server"):
        if any(script in part for part in cmd[:3]):
            return "ray::IDLE" if script == "default_worker.py" else script  # a worker not yet named
    return name


def _peak_rss(pid: int) -> int:
    """VmHWM (the process's peak RSS so far) in bytes; falls back to the current RSS."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0


class TreeSampler:
    """Peak RSS of a process and its descendants, per process, sampled in a thread until ``stop()``."""

    def __init__(self, root_pid: int, interval_s: float = 0.2, driver_label: str = "driver"):
        self.root_pid = root_pid
        self.interval_s = interval_s
        self.peaks: dict[int, int] = defaultdict(int)
        self.kinds: dict[int, str] = {root_pid: driver_label}
        self.total_peak = 0  # the largest sum of current RSS over the tree seen at one poll
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "TreeSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def sample(self) -> None:
        try:
            root = psutil.Process(self.root_pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        total = 0
        for proc in procs:
            if proc.pid != self.root_pid and not self.kinds.get(proc.pid, "").startswith("actor:"):
                kind = process_kind(proc)  # again each time: an idle worker becomes an actor
                if kind != "gone":
                    self.kinds[proc.pid] = kind
            self.peaks[proc.pid] = max(self.peaks[proc.pid], _peak_rss(proc.pid))
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        self.total_peak = max(self.total_peak, total)

    def by_kind(self) -> dict[str, tuple[int, int]]:
        """kind -> (number of processes, largest peak RSS among them)."""
        out: dict[str, tuple[int, int]] = {}
        for pid, peak in self.peaks.items():
            kind = self.kinds.get(pid, "?")
            count, top = out.get(kind, (0, 0))
            out[kind] = (count + 1, max(top, peak))
        return out


def mib(n: float) -> str:
    return f"{n / 2**20:.0f}"

