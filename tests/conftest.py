"""Shared test fixtures: small datasets in Twitter-GMNER layout, the ../shared folder, a local Ray instance."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
# ../shared beside the checkout (CI and developers); GMNER_SHARED_DIR points elsewhere.
SHARED = Path(os.environ.get("GMNER_SHARED_DIR") or REPO_ROOT.parent / "shared")
GMNER_V2 = SHARED / "data" / "twitter-gmner-v2"

# Local Ray instances in tests: no dashboard, small object store, no usage-stats prompt.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def needs_shared(path: Path = SHARED):
    return pytest.mark.skipif(not path.exists(), reason=f"{path} is absent (tests that use ../shared data)")


def write_gmner_dataset(root: Path, n: int, split: str = "train", with_xml_every: int = 3) -> Path:
    """A synthetic dataset in Twitter-GMNER layout: n tweets, every ``with_xml_every``-th with a VOC file."""
    (root / "txt").mkdir(parents=True, exist_ok=True)
    (root / "xml").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        lines += [f"IMGID:{1000 + i}", "Alice\tB-PER", "Smith\tI-PER", "visits\tO", "Paris\tB-LOC", f"#{i}\tO", ""]
        if i % with_xml_every == 0:
            (root / "xml" / f"{1000 + i}.xml").write_text(
                "<annotation><size><width>100</width><height>80</height><depth>3</depth></size>"
                "<object><name>Alice Smith</name><bndbox><xmin>10</xmin><ymin>5</ymin><xmax>50</xmax>"
                "<ymax>70</ymax></bndbox></object></annotation>", encoding="utf-8")
    (root / "txt" / f"{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture
def gmner_dataset(tmp_path: Path) -> Path:
    return write_gmner_dataset(tmp_path / "data", 24)


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray instance for the session; the runner reuses an initialised Ray."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, object_store_memory=256 * 1024 * 1024, include_dashboard=False,
                 logging_level="WARNING")
    yield ray
    ray.shutdown()


# --- real vLLM CPU servers, shared by every test file ------------------------------------------------------------------
# A vLLM CPU server costs ~60-110 s to start and ~3 GB, and an idle one still takes CPU from a 2-core machine. So each
# kind is started once per session, the tests that use it are run one after another (collection puts them together,
# at the place of the first one), and it is stopped right after the last of them. Never two at a time.

class SharedServer:
    """A server started on first use and stopped by ``pytest_runtest_teardown`` after the last test using it."""

    def __init__(self, start):
        self._start = start
        self.server = None

    def get(self):
        if self.server is None:
            self.server = self._start()
        return self.server

    def stop(self):
        if self.server is not None:
            self.server.stop()
            self.server = None


def _start_tiny_vllm():
    import json
    import logging
    import time

    from support.tiny_vllm import NO_SPLIT_PREFILL, ensure_long_model, start_vllm

    root = REPO_ROOT / ".cache" / "vllm"
    t0 = time.perf_counter()
    timings = ensure_long_model(root)
    # 2048 tokens: room for the distill stage's prompts and re-asks (the 4096-position build of the tiny Qwen2).
    server = start_vllm(root, max_model_len=2048, long=True, extra_args=NO_SPLIT_PREFILL)
    timings.update(ready_s=server.started_s, fixture_total_s=time.perf_counter() - t0)
    (root / "last-fixture-timings.json").write_text(json.dumps(timings, indent=1))
    logging.getLogger(__name__).warning("vLLM fixture: %s", timings)
    return server


def _start_tiny_vllm_vl():
    import logging
    import time

    from support.tiny_vllm import ensure_vllm_vl, start_vllm_vl

    t0 = time.perf_counter()
    timings = ensure_vllm_vl(REPO_ROOT / ".cache" / "vllm")
    server = start_vllm_vl(REPO_ROOT / ".cache" / "vllm")
    timings.update(ready_s=server.started_s, fixture_total_s=time.perf_counter() - t0)
    logging.getLogger(__name__).warning("vLLM VL fixture: %s", timings)
    return server


SHARED_SERVERS = {"vllm_server": SharedServer(_start_tiny_vllm), "vllm_vl_server": SharedServer(_start_tiny_vllm_vl)}


@pytest.fixture
def vllm_server():
    """The real vLLM OpenAI server with a tiny random Qwen2 (``tests/support/tiny_vllm.py``), max-model-len 2048."""
    return SHARED_SERVERS["vllm_server"].get()


@pytest.fixture
def vllm_vl_server():
    """The real vLLM OpenAI server with a tiny random Qwen2-VL (images over the OpenAI API)."""
    return SHARED_SERVERS["vllm_vl_server"].get()


def pytest_collection_modifyitems(items):
    """Run the tests of each shared server one after another, where the first of them was collected."""
    for name in SHARED_SERVERS:
        users = [item for item in items if name in getattr(item, "fixturenames", ())]
        if not users:
            continue
        first = items.index(users[0])
        chosen = set(map(id, users))
        rest = [item for item in items if id(item) not in chosen]
        before = sum(1 for item in items[:first] if id(item) not in chosen)
        items[:] = rest[:before] + users + rest[before:]


def pytest_runtest_teardown(item, nextitem):
    for name, shared in SHARED_SERVERS.items():
        if name in getattr(item, "fixturenames", ()) and (
                nextitem is None or name not in getattr(nextitem, "fixturenames", ())):
            shared.stop()


def pytest_sessionfinish(session, exitstatus):
    for shared in SHARED_SERVERS.values():
        shared.stop()
