"""CoNLL BIO reading shared by every text source: blocks of ``token<TAB>label`` lines separated by blank lines.

Pure functions; errors are returned (with file and line), never raised, so one bad sentence never stops an ingest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator


@dataclass
class ConllBlock:
    path: str
    line: int  # 1-based line of the block's first line
    header: str | None  # e.g. "IMGID:71044" for Twitter-GMNER, None for plain CoNLL
    tokens: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Span:
    start: int  # token span [start, end)
    end: int
    label: str  # the label without its B-/I- prefix


def read_conll_blocks(path: str | Path, header_prefix: str | None = None) -> Iterator[ConllBlock]:
    """Yield the sentences of a CoNLL file. ``header_prefix`` (e.g. ``"IMGID:"``) marks a line that opens a block.

    Token and label are split on a tab, or on the last run of whitespace when the line has no tab (some CoNLL
    exports use spaces). Extra columns in between are ignored (the label is the last column).
    """
    path = str(path)
    block: ConllBlock | None = None
    with open(path, encoding="utf-8") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = raw.rstrip("\n").rstrip("\r")
            if header_prefix is not None and line.startswith(header_prefix):
                if block is not None and (block.tokens or block.header):
                    yield block
                block = ConllBlock(path, lineno, line.strip())
                continue
            if not line.strip():
                if block is not None and header_prefix is None and block.tokens:
                    yield block
                    block = None
                continue
            if line.startswith("-DOCSTART-"):
                continue
            if block is None:
                block = ConllBlock(path, lineno, None)
                if header_prefix is not None:
                    block.errors.append(f"{path}:{lineno}: token line before any {header_prefix} header")
            parts = line.split("\t") if "\t" in line else line.rsplit(None, 1)
            if len(parts) < 2 or not parts[0] or not parts[-1].strip():
                block.errors.append(f"{path}:{lineno}: expected 'token<TAB>label', got {line!r}")
                continue
            block.tokens.append(parts[0])
            block.labels.append(parts[-1].strip())
    if block is not None and (block.tokens or block.header):
        yield block


def bio_spans(labels: list[str], where: str = "") -> tuple[list[Span], list[str]]:
    """BIO (also IOB1/BIOES-tolerant for S-/E-) labels -> spans, plus errors for malformed sequences.

    An ``I-X`` that does not continue an ``X`` entity is malformed: it is reported, and (as conlleval does) read as
    the start of a new entity so that the entity is not lost.
    """
    spans: list[Span] = []
    errors: list[str] = []
    cur: list | None = None  # [start, end, label]
    for i, lab in enumerate(labels):
        if lab == "O":
            cur = None
            continue
        prefix, sep, name = lab.partition("-")
        if not sep or prefix not in {"B", "I", "S", "E"} or not name:
            errors.append(f"{where}token {i + 1}: label {lab!r} is not O, B-X or I-X")
            cur = None
            continue
        if prefix in {"B", "S"} or cur is None or cur[2] != name:
            if prefix in {"I", "E"}:
                errors.append(f"{where}token {i + 1}: {lab!r} does not continue an entity of type {name}")
            cur = [i, i + 1, name]
            spans.append(cur)  # type: ignore[arg-type]
        else:
            cur[1] = i + 1
        if prefix in {"S", "E"}:
            cur = None
    return [Span(s, e, n) for s, e, n in spans], errors  # type: ignore[misc]
