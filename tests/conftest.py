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
        # address="local": a new instance even when `ray start` ran on this machine (or left a stale address file)
        ray.init(address="local", num_cpus=2, object_store_memory=256 * 1024 * 1024, include_dashboard=False,
                 logging_level="WARNING")
    yield ray
    ray.shutdown()
