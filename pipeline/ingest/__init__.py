"""Readers that turn datasets on disk into records: Twitter-GMNER layout, text-only CoNLL, the bundled sample.

``read_source(source_config, cache_dir)`` dispatches on the source's ``kind`` through ``READERS`` (an explicit table).
Readers never raise on a bad sample or a bad file: the record carries ``status='error'`` and a message naming file and
line (a file that is not text at all becomes one such record). They raise only on a configuration problem, such as a
configured split whose file does not exist, and ``check_source`` finds those before any record is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

from ..paths import user_cache_dir
from ..storage import is_remote


def _twitter_gmner(source, cache_dir: Path) -> Iterator[dict[str, Any]]:
    from .twitter_gmner import read_twitter_gmner

    for split in source.splits:
        yield from read_twitter_gmner(source.path, split, source=source.name, image_dir=source.image_dir,
                                      limit=source.limit, max_line_bytes=source.max_line_bytes,
                                      max_xml_bytes=source.max_xml_bytes)


def _conll(source, cache_dir: Path) -> Iterator[dict[str, Any]]:
    from .text_conll import read_text_conll

    yield from read_text_conll(source.path, label_map=source.label_map, source=source.name, split=source.split,
                               strict_labels=source.strict_labels, limit=source.limit,
                               max_line_bytes=source.max_line_bytes)


def _sample(source, cache_dir: Path) -> Iterator[dict[str, Any]]:
    from .sample import read_sample

    yield from read_sample(cache_dir, source=source.name, limit=source.limit)


READERS: dict[str, Callable[..., Iterator[dict[str, Any]]]] = {
    "twitter_gmner": _twitter_gmner,
    "conll": _conll,
    "sample": _sample,
}


def read_source(source, cache_dir: str | Path) -> Iterator[dict[str, Any]]:
    if is_remote(cache_dir):  # files a reader makes (the sample's images) are opened by path: keep them on this disk
        cache_dir = user_cache_dir("source-cache")
    return READERS[source.kind](source, Path(cache_dir))


def source_splits(source) -> list[str]:
    """The splits a source is configured to yield (each should yield at least one record)."""
    if source.kind == "twitter_gmner":
        return list(source.splits)
    if source.kind == "conll":
        return [source.split]
    return ["train"]  # the bundled sample


def check_source(source) -> None:
    """Raise ``FileNotFoundError`` naming every configured file that is missing, before ingest reads anything (a
    missing split found half-way would leave the earlier splits' shards for nothing)."""
    if source.kind == "twitter_gmner":
        from .twitter_gmner import split_file

        missing = [str(split_file(source.path, s)) for s in source.splits if not split_file(source.path, s).is_file()]
        if missing:
            raise FileNotFoundError(f"source.path={source.path}: no file for the configured split(s): "
                                    f"{', '.join(missing)}; expected the Twitter-GMNER layout <path>/txt/<split>.txt "
                                    "(set source.splits to the splits you have)")
        if source.image_dir and not Path(source.image_dir).is_dir():
            raise FileNotFoundError(f"source.image_dir={source.image_dir} is not a folder; fix the path, or drop "
                                    "image_dir to ingest the annotations only")
    elif source.kind == "conll" and not Path(source.path).is_file():
        raise FileNotFoundError(f"source.path={source.path}: CoNLL file not found")
