"""Where candidate images come from. Every source answers ``candidates(queries, query_embeddings)`` with up to
``top_k`` candidates per query; the registry ``SOURCES`` maps the config's ``kind`` to the class."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .config import LocalCorpusSource, RetrieveConfig, WebSearchSource
from .corpus import CorpusIndex, build_or_load_index, enumerate_items
from .download import SafeDownloader
from .web import SearchClient, SearchError, api_key, is_transient

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    uri: str
    path: str | None = None
    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    embedding: np.ndarray | None = None  # image embedding when the source already has it (local corpus)
    failure: str | None = None  # download_failed | unreadable_image
    message: str | None = None


@dataclass
class CandidateSet:
    candidates: list[Candidate] = field(default_factory=list)
    error: str | None = None  # the source could not answer this query at all
    transient: bool = False  # ... for a reason a rerun may not meet (the search API unreachable or overloaded)


class ImageSource:
    kind: ClassVar[str] = ""
    needs_query_embeddings: ClassVar[bool] = False  # True when candidates are found by the query's CLIP embedding

    def __init__(self, stage_cfg: RetrieveConfig, encoder: Any, store_dir: Path):
        self.stage_cfg = stage_cfg
        self.encoder = encoder
        self.store_dir = store_dir

    @classmethod
    def preflight(cls, stage_cfg: RetrieveConfig) -> None:
        """Cheap checks before the run (paths exist, keys present)."""

    def setup(self) -> None:
        pass

    def candidates(self, queries: list[str], query_embeddings: np.ndarray | None) -> list[CandidateSet]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class LocalCorpusImageSource(ImageSource):
    """Exact top-k kNN over the corpus embeddings; candidates carry their image embeddings."""

    kind = "local_corpus"
    needs_query_embeddings = True

    @classmethod
    def preflight(cls, stage_cfg: RetrieveConfig) -> None:
        cfg = stage_cfg.source
        assert isinstance(cfg, LocalCorpusSource)
        if not Path(cfg.path).expanduser().exists():
            raise FileNotFoundError(f"image corpus {cfg.path} does not exist (stages.retrieve.source.path)")
        if next(iter(enumerate_items(cfg)), None) is None:
            raise ValueError(f"image corpus {cfg.path} holds no images (jpg/png/gif/bmp/webp)")

    def setup(self) -> None:
        cfg = self.stage_cfg.source
        assert isinstance(cfg, LocalCorpusSource)
        downloader = SafeDownloader(self.stage_cfg.download, self.store_dir)
        try:
            self.index: CorpusIndex = build_or_load_index(cfg, self.encoder, self.store_dir, downloader,
                                                          self.stage_cfg.download.max_pixels)
        finally:
            downloader.close()
        if not self.index.items:
            log.warning("image corpus %s: no readable images; every sample will be dropped (no_candidates)",
                        cfg.path)

    def candidates(self, queries: list[str], query_embeddings: np.ndarray | None) -> list[CandidateSet]:
        assert query_embeddings is not None  # needs_query_embeddings
        _, indices = self.index.search(query_embeddings, self.stage_cfg.top_k)  # the stage rescores
        out = []
        for row in indices:
            cands = []
            for i in row:
                if i < 0:  # faiss pads with -1 when fewer than k exist
                    continue
                item = self.index.items[int(i)]
                cands.append(Candidate(uri=item["uri"], path=item.get("stored_path") or item["path"],
                                       sha256=item["sha256"], width=item["width"], height=item["height"],
                                       embedding=self.index.embeddings[int(i)]))
            out.append(CandidateSet(cands))
        return out


class WebSearchImageSource(ImageSource):
    """Search API -> result URLs -> safe downloads into the content-addressed store; the stage embeds the images."""

    kind = "web_api"

    @classmethod
    def preflight(cls, stage_cfg: RetrieveConfig) -> None:
        assert isinstance(stage_cfg.source, WebSearchSource)
        api_key(stage_cfg.source)

    def setup(self) -> None:
        assert isinstance(self.stage_cfg.source, WebSearchSource)
        self.client = SearchClient(self.stage_cfg.source)
        self.downloader = SafeDownloader(self.stage_cfg.download, self.store_dir)
        self._pool = ThreadPoolExecutor(max_workers=self.stage_cfg.source.concurrency, thread_name_prefix="search")

    def _search(self, query: str) -> list[str] | SearchError:
        try:
            return self.client.search(query, self.stage_cfg.top_k)
        except SearchError as exc:
            return exc

    def candidates(self, queries: list[str], query_embeddings: np.ndarray | None) -> list[CandidateSet]:
        found = list(self._pool.map(self._search, queries))  # one request per query, retried inside the client
        urls = [u for f in found if isinstance(f, list) for u in f]
        results = dict(zip(urls, self.downloader.fetch_many(urls), strict=True))
        out = []
        for f in found:
            if isinstance(f, SearchError):
                out.append(CandidateSet(error=f"image search failed: {f}", transient=is_transient(f)))
                continue
            cands = []
            for url in f:
                r = results[url]
                cands.append(Candidate(uri=url, path=r.path, sha256=r.sha256, width=r.width, height=r.height,
                                       failure=r.reason, message=r.message))
            out.append(CandidateSet(cands))
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()
        self.downloader.close()


SOURCES: dict[str, type[ImageSource]] = {
    LocalCorpusImageSource.kind: LocalCorpusImageSource,
    WebSearchImageSource.kind: WebSearchImageSource,
}
