"""Readers that turn datasets on disk into records: Twitter-GMNER layout, text-only CoNLL, the bundled sample.

``read_source(source_config, cache_dir)`` dispatches on the source's ``kind`` through ``READERS`` (an explicit table).
Readers never raise on a bad sample: the record carries ``status='error'`` and a message naming file and line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator


def _twitter_gmner(source, cache_dir: Path) -> Iterator[dict[str, Any]]:
    from .twitter_gmner import read_twitter_gmner

    for split in source.splits:
        yield from read_twitter_gmner(source.path, split, source=source.name, image_dir=source.image_dir,
                                      limit=source.limit)


def _conll(source, cache_dir: Path) -> Iterator[dict[str, Any]]:
    from .text_conll import read_text_conll

    yield from read_text_conll(source.path, label_map=source.label_map, source=source.name, split=source.split,
                               strict_labels=source.strict_labels, limit=source.limit)


def _sample(source, cache_dir: Path) -> Iterator[dict[str, Any]]:
    from .sample import read_sample

    yield from read_sample(cache_dir, source=source.name, limit=source.limit)


READERS: dict[str, Callable[..., Iterator[dict[str, Any]]]] = {
    "twitter_gmner": _twitter_gmner,
    "conll": _conll,
    "sample": _sample,
}


def read_source(source, cache_dir: str | Path) -> Iterator[dict[str, Any]]:
    return READERS[source.kind](source, Path(cache_dir))
