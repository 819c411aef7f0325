"""A local image corpus: enumerate its images, embed them once per CLIP model, store that index beside the corpus, and
answer exact top-k cosine searches.

Layouts (``format: auto`` picks from the path):
  * folder: image files anywhere below it;
  * parquet: one file or a folder of ``*.parquet``; ``image_column`` holds bytes or a ``{bytes, path}`` struct (the
    Hugging Face ``datasets`` Image layout);
  * webdataset: one ``.tar`` or a folder of them; every image member is one item (sidecar files are ignored);
  * list: a text file, one image path (relative to the file) or http(s) URL per line; URLs are fetched once with the
    safe downloader into the content-addressed store.

The index lives in ``<index_dir>/<model slug>/``: ``embeddings.npy`` (float32, L2-normalised), ``items.parquet``
(one row per embedded image) and ``meta.json`` (model id, corpus, counts, skipped items and why). Items are keyed
by location + size + mtime, so a rebuild after the corpus changed embeds only new or changed images. One worker
builds while the others wait on a file lock.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gmner_pipeline.atomic import atomic_open
from gmner_pipeline.paths import user_cache_dir

from .config import LocalCorpusSource
from .images import IMAGE_SUFFIXES, UnreadableImage, open_checked, sha256_hex, store_content_addressed, to_rgb

log = logging.getLogger(__name__)

INDEX_VERSION = 1


@dataclass(frozen=True)
class CorpusItem:
    """One image of the corpus, before it is read. ``location`` says how to get its bytes."""

    key: str  # stable identity of this exact content location (path|size|mtime, file:row|..., url)
    uri: str  # what records show as the image's origin
    kind: str  # file | parquet | tar | url
    path: str  # the file to read (the image, the parquet file, the tar file)
    member: str = ""  # tar member name
    offset: int = -1  # tar data offset / parquet row
    size: int = -1


ITEM_COLUMNS = ["key", "uri", "kind", "path", "member", "offset", "size", "sha256", "width", "height", "stored_path"]


def detect_format(path: Path) -> str:
    if path.is_dir():
        if any(path.glob("*.parquet")):
            return "parquet"
        if any(path.glob("*.tar")):
            return "webdataset"
        return "folder"
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix == ".tar":
        return "webdataset"
    if suffix in (".txt", ".lst", ".list"):
        return "list"
    raise ValueError(f"cannot tell the corpus format of {path}; set stages.retrieve.source.format")


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def enumerate_items(cfg: LocalCorpusSource) -> Iterator[CorpusItem]:
    """Every image location in the corpus, in a stable order. Reads no image bytes (parquet rows excepted: none)."""
    root = Path(cfg.path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"image corpus {root} does not exist (stages.retrieve.source.path)")
    fmt = cfg.format if cfg.format != "auto" else detect_format(root)
    if fmt == "folder":
        for path in sorted(root.rglob("*")):
            inner = path.relative_to(root).parts
            if path.suffix.lower() not in IMAGE_SUFFIXES or any(p.startswith(".") or p.endswith(".clip-index")
                                                                 for p in inner) or not path.is_file():
                continue
            yield CorpusItem(_stat_key(path), str(path.resolve()), "file", str(path.resolve()))
    elif fmt == "parquet":
        files = sorted(root.glob("*.parquet")) if root.is_dir() else [root]
        for file in files:
            base = _stat_key(file)
            pf = pq.ParquetFile(file)
            if cfg.image_column not in pf.schema_arrow.names:
                raise ValueError(f"{file}: no column {cfg.image_column!r} (has {pf.schema_arrow.names}); "
                                 "set stages.retrieve.source.image_column")
            uris = (pf.read(columns=[cfg.uri_column]).column(0).to_pylist() if cfg.uri_column
                    else [None] * pf.metadata.num_rows)
            for row, uri in enumerate(uris):
                yield CorpusItem(f"{base}#{row}", uri or f"{file.resolve()}#{row}", "parquet", str(file.resolve()),
                                 offset=row)
    elif fmt == "webdataset":
        files = sorted(root.glob("*.tar")) if root.is_dir() else [root]
        for file in files:
            base = _stat_key(file)
            with tarfile.open(file) as tar:
                for member in tar:
                    if member.isfile() and Path(member.name).suffix.lower() in IMAGE_SUFFIXES:
                        yield CorpusItem(f"{base}#{member.name}", f"{file.resolve()}#{member.name}", "tar",
                                         str(file.resolve()), member.name, member.offset_data, member.size)
    elif fmt == "list":
        for line in root.read_text(encoding="utf-8").splitlines():
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            if re.match(r"^https?://", entry, re.IGNORECASE):
                yield CorpusItem(entry, entry, "url", "")
            else:
                path = (root.parent / entry).expanduser()
                key = _stat_key(path) if path.is_file() else f"{path}|missing"
                yield CorpusItem(key, str(path.resolve()), "file", str(path.resolve()))
    else:  # pragma: no cover - guarded by the config's Literal
        raise ValueError(fmt)


class ItemReader:
    """Reads the bytes of corpus items; keeps Parquet files open and maps rows to row groups."""

    def __init__(self, image_column: str, downloader: Any = None):
        self.image_column = image_column
        self.downloader = downloader
        self._parquet: dict[str, tuple[pq.ParquetFile, np.ndarray]] = {}
        self._group: tuple[str, int, Any] = ("", -1, None)  # items come in file order: keep the last row group

    def read(self, item: CorpusItem) -> bytes:
        if item.kind == "file":
            return Path(item.path).read_bytes()
        if item.kind == "tar":
            with open(item.path, "rb") as fh:
                fh.seek(item.offset)
                return fh.read(item.size)
        if item.kind == "parquet":
            return self._parquet_bytes(item.path, item.offset)
        if item.kind == "url":
            if self.downloader is None:
                raise OSError("URL corpus items need the downloader")
            result = self.downloader.fetch(item.uri)
            if not result.ok:
                raise OSError(f"download failed: {result.message}")
            return Path(result.path).read_bytes()
        raise ValueError(item.kind)

    def _parquet_bytes(self, path: str, row: int) -> bytes:
        if path not in self._parquet:
            pf = pq.ParquetFile(path)
            starts = np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
            self._parquet[path] = (pf, starts)
        pf, starts = self._parquet[path]
        group = int(np.searchsorted(starts, row, side="right") - 1)
        cached_path, cached_group, column = self._group
        if (cached_path, cached_group) != (path, group):
            column = pf.read_row_group(group, columns=[self.image_column]).column(0)
            self._group = (path, group, column)
        value = column[row - int(starts[group])].as_py()
        if isinstance(value, dict):
            value = value.get("bytes") or (Path(value["path"]).read_bytes() if value.get("path") else None)
        if not isinstance(value, (bytes, bytearray)):
            raise UnreadableImage(f"{path} row {row}: column {self.image_column!r} holds no image bytes")
        return bytes(value)


def model_slug(model_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model_id).strip("_")


def default_index_dir(corpus_path: str) -> Path:
    """``<corpus>.clip-index`` beside the corpus when writable, else a per-corpus folder in the user cache."""
    corpus = Path(corpus_path).expanduser().resolve()
    beside = corpus.parent / f"{corpus.name}.clip-index"
    if os.access(corpus.parent, os.W_OK) or os.access(beside, os.W_OK):
        return beside
    return user_cache_dir("clip-index") / f"{corpus.name}-{sha256_hex(str(corpus).encode())[:12]}"


@dataclass
class CorpusIndex:
    """The embedded corpus: row i of ``embeddings`` belongs to row i of ``items``."""

    embeddings: np.ndarray
    items: list[dict[str, Any]]
    meta: dict[str, Any]
    faiss_index: Any = None

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k by cosine (inner product of unit vectors): (scores [q, k'], indices [q, k']), k' = min(k, n)."""
        return top_k(self.embeddings, queries, k, self.faiss_index)


def top_k(matrix: np.ndarray, queries: np.ndarray, k: int, faiss_index: Any = None) -> tuple[np.ndarray, np.ndarray]:
    n = matrix.shape[0]
    k = min(k, n)
    if k == 0 or queries.shape[0] == 0:
        return np.zeros((queries.shape[0], 0), np.float32), np.zeros((queries.shape[0], 0), np.int64)
    if faiss_index is not None:
        scores, idx = faiss_index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return scores.astype(np.float32), idx.astype(np.int64)
    sims = queries.astype(np.float32) @ matrix.T
    idx = np.argpartition(-sims, kth=k - 1, axis=1)[:, :k] if k < n else np.tile(np.arange(n), (len(sims), 1))
    part = np.take_along_axis(sims, idx, axis=1)
    order = np.argsort(-part, axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1), np.take_along_axis(idx, order, axis=1)


def maybe_faiss(embeddings: np.ndarray, min_items: int) -> Any:
    if embeddings.shape[0] < min_items:
        return None
    try:
        import faiss
    except ImportError:
        log.info("faiss is not installed: exact numpy search over %d images (pip install faiss-cpu)",
                 embeddings.shape[0])
        return None
    index = faiss.IndexFlatIP(embeddings.shape[1])
    index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
    return index


def _load_existing(folder: Path) -> tuple[dict[str, int], np.ndarray | None, list[dict[str, Any]]]:
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("index_version") != INDEX_VERSION:
            return {}, None, []
        emb = np.load(folder / "embeddings.npy")
        rows = pq.read_table(folder / "items.parquet").to_pylist()
    except (OSError, ValueError, pa.ArrowException):
        return {}, None, []
    return {row["key"]: i for i, row in enumerate(rows)}, emb, rows


def build_or_load_index(cfg: LocalCorpusSource, encoder: Any, store_dir: Path, downloader: Any = None,
                        max_pixels: int = 40_000_000) -> CorpusIndex:
    """Load the index for ``encoder.model_id``, embedding what is new in the corpus first (under a file lock)."""
    from filelock import FileLock

    index_root = Path(cfg.index_dir).expanduser() if cfg.index_dir else default_index_dir(cfg.path)
    folder = index_root / model_slug(encoder.model_id)
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / ".lock")):
        items = list(enumerate_items(cfg))
        known, old_emb, old_rows = _load_existing(folder)
        current = {item.key for item in items}
        meta_path = folder / "meta.json"
        if old_emb is not None and meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            if set(known) | set(meta.get("skipped_keys", [])) == current:
                index = CorpusIndex(old_emb, old_rows, meta)
                index.faiss_index = maybe_faiss(old_emb, cfg.faiss_min_items)
                log.info("corpus index %s: %d images (cached)", folder, len(old_rows))
                return index
        index = _build(cfg, encoder, items, known, old_emb, old_rows, folder, store_dir, downloader, max_pixels)
    index.faiss_index = maybe_faiss(index.embeddings, cfg.faiss_min_items)
    return index


def _build(cfg: LocalCorpusSource, encoder: Any, items: list[CorpusItem], known: dict[str, int],
           old_emb: np.ndarray | None, old_rows: list[dict[str, Any]], folder: Path, store_dir: Path,
           downloader: Any, max_pixels: int) -> CorpusIndex:
    t0 = time.perf_counter()
    reader = ItemReader(cfg.image_column, downloader)
    reused = [item for item in items if item.key in known and old_emb is not None]
    fresh = [item for item in items if not (item.key in known and old_emb is not None)]

    def load(item: CorpusItem):
        data = reader.read(item)
        img, info = open_checked(data, max_pixels)
        digest = sha256_hex(data)
        stored = ""
        if item.kind in ("parquet", "tar", "url"):  # give later stages a plain local file to open
            stored = str(store_content_addressed(data, store_dir, info.extension, digest))
        return to_rgb(img), {"sha256": digest, "width": info.width, "height": info.height, "stored_path": stored}

    encoded = encoder.encode_images(fresh, load)
    rows: list[dict[str, Any]] = []
    vectors: list[np.ndarray] = []
    skipped: dict[str, str] = {}
    for item in reused:
        rows.append(old_rows[known[item.key]])
        vectors.append(old_emb[known[item.key]])
    for item, vec, meta, err in zip(fresh, encoded.embeddings, encoded.metas, encoded.errors, strict=True):
        if err is not None:
            skipped[item.key] = err
            log.warning("corpus image %s skipped: %s", item.uri, err)
            continue
        rows.append({**asdict(item), **meta})
        vectors.append(vec)
    dim = encoded.embeddings.shape[1] if len(fresh) else (old_emb.shape[1] if old_emb is not None else 0)
    embeddings = np.stack(vectors).astype(np.float32) if vectors else np.zeros((0, dim), np.float32)
    meta = {
        "index_version": INDEX_VERSION,
        "model_id": encoder.model_id,
        "corpus": str(Path(cfg.path).expanduser().resolve()),
        "items": len(rows),
        "embedded_now": len(fresh) - len(skipped),
        "reused": len(reused),
        "skipped": len(skipped),
        "skipped_keys": sorted(skipped),
        "skipped_reasons": skipped,
        "seconds": round(time.perf_counter() - t0, 3),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _write_atomic(folder / "embeddings.npy", lambda fh: np.save(fh, embeddings))
    table = pa.Table.from_pylist([{c: row.get(c) for c in ITEM_COLUMNS} for row in rows], schema=_ITEMS_SCHEMA)
    _write_atomic(folder / "items.parquet", lambda fh: pq.write_table(table, fh))
    _write_atomic(folder / "meta.json", lambda fh: fh.write(json.dumps(meta, indent=1).encode()))
    log.info("corpus index %s: %d images (%d embedded now, %d reused, %d skipped) in %.1fs", folder, len(rows),
             meta["embedded_now"], len(reused), len(skipped), meta["seconds"])
    return CorpusIndex(embeddings, rows, meta)


_ITEMS_SCHEMA = pa.schema([
    ("key", pa.string()), ("uri", pa.string()), ("kind", pa.string()), ("path", pa.string()),
    ("member", pa.string()), ("offset", pa.int64()), ("size", pa.int64()), ("sha256", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("stored_path", pa.string()),
])


def _write_atomic(target: Path, write: Any) -> None:
    with atomic_open(target, "wb") as fh:
        write(fh)
