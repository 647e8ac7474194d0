"""Where the last complete record of a results file ends, at every byte offset.

A CSV record ends at a newline preceded by an even number of quote characters (a quote inside a
field is doubled, and every text field is quoted); a JSONL record at any newline (JSON escapes them).
The writer (``output``) cuts a killed run's partial record there; every reader
(``predictions_file``) stops there.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import BinaryIO

_CHUNK = 1 << 20


def last_record_end(path: Path | BinaryIO, quoted: bool) -> int:
    """Byte offset just after the last complete record: after the last newline that is outside any
    quoted field (``quoted``: CSV) or after the last newline (JSONL, whose strings escape them).
    ``path`` may be an open binary file (read from its start; its position is left anywhere)."""
    if hasattr(path, "read"):
        return _last_record_end(path, os.fstat(path.fileno()).st_size, quoted)
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb") as f:
        return _last_record_end(f, size, quoted)


def record_end_in(data: bytes, quoted: bool) -> int:
    """``last_record_end`` of bytes in memory that start at a record."""
    return _last_record_end(io.BytesIO(data), len(data), quoted)


def _last_record_end(f: BinaryIO, size: int, quoted: bool) -> int:
    if size == 0:
        return 0
    total_quotes = 0
    if quoted:  # quote parity of the whole file, counted fast in large chunks
        f.seek(0)
        remaining = size
        while remaining > 0 and (block := f.read(min(_CHUNK, remaining))):
            total_quotes += block.count(b'"')
            remaining -= len(block)
    pos = size
    quotes_after = 0  # quotes in [pos, size)
    while pos > 0:
        start = max(0, pos - _CHUNK)
        f.seek(start)
        block = f.read(pos - start)
        end = len(block)
        while True:
            nl = block.rfind(b"\n", 0, end)
            if nl < 0:
                break
            if not quoted:
                return start + nl + 1
            q_after = quotes_after + block.count(b'"', nl, len(block))
            if (total_quotes - q_after) % 2 == 0:  # even number of quotes before it: a record boundary
                return start + nl + 1
            end = nl
        quotes_after += block.count(b'"') if quoted else 0
        pos = start
    return 0
