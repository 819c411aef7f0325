"""The safe downloader and the search client against a real local HTTP server serving good and hostile responses."""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the local test server helper
from retrieve_server import API_KEY, HostileServer  # noqa: E402

from gmner_pipeline.stage import StageSetupError  # noqa: E402
from gmner_pipeline.stages.retrieve.config import DownloadConfig, WebSearchSource  # noqa: E402
from gmner_pipeline.stages.retrieve.download import SafeDownloader  # noqa: E402
from gmner_pipeline.stages.retrieve.web import SearchClient, SearchError  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server():
    with HostileServer() as srv:
        yield srv


def make(tmp_path, **overrides) -> SafeDownloader:
    settings = dict(allow_private_hosts=True, retries=3, backoff_s=0.01, per_host_interval_s=0.0, max_bytes=200_000,
                    read_timeout_s=2.0, total_timeout_s=1.0, connect_timeout_s=2.0)
    settings.update(overrides)
    return SafeDownloader(DownloadConfig(**settings), tmp_path / "store")


def test_good_images_are_stored_content_addressed_and_deduplicated(server, tmp_path):
    dl = make(tmp_path)
    red, blue, copy = dl.fetch_many([f"{server.url}/img/red.png", f"{server.url}/img/blue.jpg",
                                     f"{server.url}/img/red-copy.png"])
    assert red.ok and blue.ok and copy.ok
    assert (red.width, red.height, red.format) == (48, 32, "PNG") and blue.format == "JPEG"
    assert red.sha256 == hashlib.sha256(server.red).hexdigest() == copy.sha256
    assert red.path == copy.path and red.path.endswith(f"{red.sha256[:2]}/{red.sha256}.png")
    stored = [p for p in (tmp_path / "store").rglob("*") if p.is_file()]
    assert len(stored) == 2  # two distinct pictures, three URLs


@pytest.mark.parametrize("route, reason, words", [
    ("/html", "download_failed", "Content-Type 'text/html'"),
    ("/fake.jpg", "unreadable_image", "not a JPEG/PNG"),
    ("/truncated.png", "unreadable_image", "cannot decode"),
    ("/bomb.png", "unreadable_image", "decompression bomb"),
    ("/huge-declared", "download_failed", "Content-Length"),
    ("/huge-stream", "download_failed", "exceeds max_bytes"),
    ("/gzip-bomb", "download_failed", "exceeds max_bytes"),
    ("/slow", "download_failed", "total_timeout_s"),
    ("/redirect/5", "download_failed", "more than 3 redirects"),
    ("/to-file", "download_failed", "refused scheme 'file'"),
    ("/missing", "download_failed", "HTTP 404"),
])
def test_hostile_responses_fail_with_a_reason(server, tmp_path, route, reason, words):
    result = make(tmp_path).fetch(server.url + route)
    assert not result.ok
    assert (result.reason, words in result.message) == (reason, True), result.message
    assert not list((tmp_path / "store").rglob("*.png"))


def test_pixel_limit_applies_to_real_images(server, tmp_path):
    result = make(tmp_path, max_pixels=10_000).fetch(f"{server.url}/img/big.png")
    assert (result.ok, result.reason) == (False, "unreadable_image")


def test_bounded_redirects_are_followed(server, tmp_path):
    result = make(tmp_path).fetch(f"{server.url}/redirect/3")
    assert result.ok and result.sha256 == hashlib.sha256(server.red).hexdigest()


def test_transient_errors_are_retried_permanent_ones_are_not(server, tmp_path):
    flaky = make(tmp_path).fetch(f"{server.url}/flaky/a")
    assert flaky.ok and flaky.attempts == 3
    limited = make(tmp_path).fetch(f"{server.url}/always-429")
    assert (limited.ok, limited.attempts, limited.reason) == (False, 3, "download_failed")
    assert "HTTP 429" in limited.message
    missing = make(tmp_path).fetch(f"{server.url}/missing")
    assert missing.attempts == 1


def test_private_hosts_are_refused_by_default(server, tmp_path):
    result = make(tmp_path, allow_private_hosts=False).fetch(f"{server.url}/img/red.png")
    assert not result.ok and "non-public address 127.0.0.1" in result.message


def test_per_host_rate_limit_spaces_requests(server, tmp_path):
    dl = make(tmp_path, per_host_interval_s=0.15, workers=4)
    t0 = time.monotonic()
    results = dl.fetch_many([f"{server.url}/img/red.png?{i}" for i in range(4)])
    assert all(r.ok for r in results)
    assert time.monotonic() - t0 >= 0.45  # 4 requests to one host: at least 3 intervals


def test_search_client_reads_urls_and_needs_the_key(server, monkeypatch):
    cfg = WebSearchSource(endpoint=f"{server.url}/search", api_key_env="TEST_IMG_KEY", backoff_s=0.01)
    monkeypatch.delenv("TEST_IMG_KEY", raising=False)
    with pytest.raises(StageSetupError, match="TEST_IMG_KEY"):
        SearchClient(cfg)
    monkeypatch.setenv("TEST_IMG_KEY", API_KEY)
    urls = SearchClient(cfg).search("cats", 1)
    assert urls == [f"{server.url}/img/red.png"]
    monkeypatch.setenv("TEST_IMG_KEY", "wrong")
    with pytest.raises(SearchError, match="HTTP 401"):
        SearchClient(cfg).search("cats", 5)
    down = WebSearchSource(endpoint=f"{server.url}/search-down", api_key_env=None, backoff_s=0.01, retries=2)
    with pytest.raises(SearchError, match="HTTP 500"):
        SearchClient(down).search("cats", 5)
    assert server.hits["/search-down"] == 2
