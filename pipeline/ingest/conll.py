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
    lines: list[int] = field(default_factory=list)  # 1-based line of each token
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Span:
    start: int  # token span [start, end)
    end: int
    label: str  # the label without its B-/I- prefix


# A CoNLL line holds one token and its label; a longer line is broken data (or not CoNLL at all), and reading it whole
# would let one bad file exhaust the driver's memory.
DEFAULT_MAX_LINE_BYTES = 64 * 1024
_SNIFF_BYTES = 8192  # like git and grep: a NUL byte in the first 8 KiB means a binary file


def not_text_reason(head: bytes) -> str | None:
    """Why the first bytes of a file say it is not UTF-8 text (binary, UTF-16), or None."""
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "it is UTF-16 text; convert it to UTF-8 (e.g. iconv -f utf-16 -t utf-8)"
    nul = head.find(b"\x00")
    if nul >= 0:
        return f"it holds binary data (a NUL byte at offset {nul}); is this the right file?"
    return None


def read_lines(path: str, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> Iterator[tuple[int, str | None, str | None]]:
    """``(lineno, text, error)`` per line of a UTF-8 text file, without its line ending.

    Read as bytes, so that a bad byte or an over-long line is an error on that line instead of an exception that
    ends the file: an undecodable line comes back decoded with U+FFFD in place of the bad bytes (the record keeps what
    could be read) plus an error; a line over ``max_line_bytes`` comes back as ``None`` (skipped without ever being
    held in memory whole) plus an error.
    """
    with open(path, "rb") as fh:
        lineno = 0
        while True:
            raw = fh.readline(max_line_bytes + 1)
            if not raw:
                return
            lineno += 1
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                while raw and not raw.endswith(b"\n"):  # skip the rest of the line in bounded pieces
                    raw = fh.readline(1 << 20)
                yield lineno, None, (f"{path}:{lineno}: line is longer than {max_line_bytes} bytes "
                                     "(source.max_line_bytes); a CoNLL line holds one token and its label")
                continue
            raw = raw.rstrip(b"\n").rstrip(b"\r")
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark (some editors write one)
            try:
                yield lineno, raw.decode("utf-8"), None
            except UnicodeDecodeError as exc:
                yield lineno, raw.decode("utf-8", errors="replace"), (
                    f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                    "convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)")


def read_conll_blocks(path: str | Path, header_prefix: str | None = None,
                      max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> Iterator[ConllBlock]:
    """Yield the sentences of a CoNLL file. ``header_prefix`` (e.g. ``"IMGID:"``) marks a line that opens a block.

    Token and label are split on a tab, or on the last run of whitespace when the line has no tab (some CoNLL
    exports use spaces). Extra columns in between are ignored (the label is the last column).

    Never raises on content: a bad line is an error on its block (``file:line: what``), a block that holds only
    errors is still yielded, and a file that is not text at all (binary, UTF-16) yields one block holding that error.
    An unreadable file raises ``OSError`` (a missing split is a configuration problem, reported before ingest).
    """
    path = str(path)
    with open(path, "rb") as fh:
        reason = not_text_reason(fh.read(_SNIFF_BYTES))
    if reason:
        yield ConllBlock(path, 1, None, errors=[f"{path}: not a CoNLL text file: {reason}"])
        return
    block: ConllBlock | None = None

    def keep(b: ConllBlock | None) -> bool:
        return b is not None and bool(b.tokens or b.header or b.errors)

    for lineno, line, line_error in read_lines(path, max_line_bytes):
        if line is None:  # too long to read: only its error is kept, on the block it falls in
            pass
        elif header_prefix is not None and line.startswith(header_prefix):
            if keep(block):
                yield block  # type: ignore[misc]
            block = ConllBlock(path, lineno, line.strip())
        elif not line.strip():
            if header_prefix is None and keep(block):
                yield block  # type: ignore[misc]
                block = None
        elif not line.startswith("-DOCSTART-"):
            if block is None:
                block = ConllBlock(path, lineno, None)
                if header_prefix is not None:
                    block.errors.append(f"{path}:{lineno}: token line before any {header_prefix} header")
            parts = line.split("\t") if "\t" in line else line.rsplit(None, 1)
            if len(parts) < 2 or not parts[0] or not parts[-1].strip():
                block.errors.append(f"{path}:{lineno}: expected 'token<TAB>label', got {line!r}")
            elif "\x00" in line:
                block.errors.append(f"{path}:{lineno}: holds a NUL byte (binary data in a text file)")
            else:  # kept even when undecodable (U+FFFD in place of the bad bytes): its error is added below
                block.tokens.append(parts[0])
                block.labels.append(parts[-1].strip())
                block.lines.append(lineno)
        if line_error is not None:
            if block is None:
                block = ConllBlock(path, lineno, None)
            block.errors.append(line_error)
    if keep(block):
        yield block  # type: ignore[misc]


def bio_spans(labels: list[str], path: str | None = None, lines: list[int] | None = None
              ) -> tuple[list[Span], list[str]]:
    """BIO (also IOB1/BIOES-tolerant for S-/E-) labels -> spans, plus errors for malformed sequences.

    An ``I-X`` that does not continue an ``X`` entity is malformed: it is reported, and (as conlleval does) read as
    the start of a new entity so that the entity is not lost.
    """
    spans: list[Span] = []
    errors: list[str] = []

    def where(i: int) -> str:
        return f"{path}:{lines[i]}: " if path and lines else f"token {i + 1}: "

    cur: list | None = None  # [start, end, label]
    for i, lab in enumerate(labels):
        if lab == "O":
            cur = None
            continue
        prefix, sep, name = lab.partition("-")
        if not sep or prefix not in {"B", "I", "S", "E"} or not name:
            errors.append(f"{where(i)}label {lab!r} is not O, B-X or I-X")
            cur = None
            continue
        if prefix in {"B", "S"} or cur is None or cur[2] != name:
            if prefix in {"I", "E"}:
                errors.append(f"{where(i)}{lab!r} does not continue an entity of type {name}")
            cur = [i, i + 1, name]
            spans.append(cur)  # type: ignore[arg-type]
        else:
            cur[1] = i + 1
        if prefix in {"S", "E"}:
            cur = None
    return [Span(s, e, n) for s, e, n in spans], errors  # type: ignore[misc]
