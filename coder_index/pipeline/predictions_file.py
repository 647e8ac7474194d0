"""The one reader of predictions files (what ``classify`` writes: ``.csv`` or ``.jsonl``).

Every place that reads rows back comes through here: resume (the paths OUT holds), ``explain
--predictions OUT --row N``, and ``serve``'s browser (incrementally, as a run appends). A name that
is not valid UTF-8 comes back as Python's surrogate escapes, whichever way it was written (CSV: its
raw bytes; JSONL: ``\\udcXX`` escapes), so every row that was written can be read, and named again.

Only complete records are read: a run killed mid-record leaves a tail that ``last_record_end`` stops
before.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from coder_index.core.errors import InputFormatError
from coder_index.pipeline.record_ends import last_record_end, record_end_in

HEADER = ["path", "label", "score", "method"]


@dataclass
class PredictionRow:
    path: str
    label: str
    score: float
    method: str
    top: list[tuple[str, float]]      # (label, score), best first; the row's own first
    stage1: str | None = None         # CODER* rows: stage 1's first class


class BadRecord(ValueError):
    """A record that is not a prediction row (its number, 1-based, is ``line``)."""

    def __init__(self, line: int, why: str) -> None:
        super().__init__(f"record {line}: {why}")
        self.line = line


class PredictionsReader:
    """Rows of one predictions file, decoded from its bytes in order; the CSV header is kept between
    calls so that appended records are read on their own. ``strict``: a record that is not a
    prediction raises ``BadRecord``; otherwise it is skipped and counted (``bad``)."""

    def __init__(self, path: str | Path, *, strict: bool = False) -> None:
        self.path = Path(path)
        self.format = self.path.suffix.lower().lstrip(".")
        if self.format not in ("csv", "jsonl"):
            raise InputFormatError(f"{self.path}: a predictions file (.csv or .jsonl) is expected")
        self.strict = strict
        self.header: list[str] | None = None
        self.bad = 0
        self.records = 0

    @property
    def quoted(self) -> bool:
        return self.format == "csv"

    def rows(self, data: bytes, *, paths_only: bool = False) -> Iterator[PredictionRow]:
        """The rows of ``data``: whole records, the next bytes of the file after those read before.
        ``paths_only``: rows with their path alone (what resume needs, read several times faster)."""
        text = data.decode("utf-8", errors="surrogateescape")
        yield from self._csv(text, paths_only) if self.format == "csv" else self._jsonl(text, paths_only)

    def read_all(self, f: BinaryIO, *, paths_only: bool = False) -> Iterator[PredictionRow]:
        """Every complete record of an open file, read in blocks (memory: a block, not the file)."""
        end = last_record_end(f, quoted=self.quoted)
        f.seek(0)
        pos, tail = 0, b""
        while pos < end:
            block = f.read(min(1 << 22, end - pos))
            if not block:
                break
            pos += len(block)
            data = tail + block
            cut = _last_complete(data, self.quoted) if pos < end else len(data)
            tail = data[cut:]
            yield from self.rows(data[:cut], paths_only=paths_only)

    # ------------------------------------------------------------------ formats
    def _csv(self, text: str, paths_only: bool = False) -> Iterator[PredictionRow]:
        for row in csv.reader(io.StringIO(text, newline="")):
            if not row:
                continue
            self.records += 1
            if self.header is None:
                if row[:4] != HEADER:
                    raise InputFormatError(f"{self.path} is not a coder-index predictions file (its header is "
                                           f"{[c[:40] for c in row[:4]]!r})")
                self.header = row
                self._cols = [(row.index(f"label_{i}"), row.index(f"score_{i}")) for i in range(2, len(row))
                              if f"label_{i}" in row and f"score_{i}" in row]
                self._stage1 = row.index("stage1_label") if "stage1_label" in row else None
                continue
            try:
                if len(row) != len(self.header):
                    raise ValueError(f"{len(row)} columns where the header has {len(self.header)}")
                if paths_only:
                    yield PredictionRow(row[0], "", 0.0, "", [])
                    continue
                top = [(row[1], _score(row[2]))] + [(row[a], _score(row[b])) for a, b in self._cols if row[a] != ""]
                stage1 = row[self._stage1] if self._stage1 is not None and row[self._stage1] else None
                yield PredictionRow(row[0], row[1], top[0][1], row[3], top, stage1)
            except (ValueError, IndexError) as exc:
                self._bad(str(exc))

    def _jsonl(self, text: str, paths_only: bool = False) -> Iterator[PredictionRow]:
        for line in text.split("\n"):
            if not line.strip():
                continue
            self.records += 1
            try:
                r = json.loads(line)  # a name's \udcXX escapes come back as Python's surrogate escapes
                if paths_only and isinstance(r, dict) and isinstance(r.get("path"), str):
                    yield PredictionRow(r["path"], "", 0.0, "", [])
                    continue
                if not isinstance(r, dict) or not all(isinstance(r.get(k), str) for k in ("path", "label", "method")):
                    raise ValueError("not a prediction row")
                top = [(str(t["label"]), _score(t["score"])) for t in r["top_k"]]
                if not top:
                    raise ValueError("no classes")
                stage1 = r.get("stage1")
                stage1 = str(stage1["label"]) if isinstance(stage1, dict) and "label" in stage1 else None
                yield PredictionRow(r["path"], r["label"], _score(r["score"]), r["method"], top, stage1)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, RecursionError) as exc:
                self._bad(f"{exc.__class__.__name__}: {exc}")

    def _bad(self, why: str) -> None:
        self.bad += 1
        if self.strict:
            raise BadRecord(self.records, why)


def read_rows(path: str | Path, *, strict: bool = False, paths_only: bool = False,
              reader: PredictionsReader | None = None) -> Iterator[PredictionRow]:
    """Every row of a predictions file (a missing or empty file has none)."""
    from coder_index.core.untrusted import open_regular_file

    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return
    reader = reader or PredictionsReader(path, strict=strict)
    with open_regular_file(path) as f:
        yield from reader.read_all(f, paths_only=paths_only)


def _score(value: object) -> float:
    """A score as the file holds it: a finite number (a bool or a string of one is not one)."""
    if isinstance(value, bool):
        raise ValueError("a score is a number, not a bool")
    v = float(value)  # type: ignore[arg-type]
    if not math.isfinite(v):
        raise ValueError(f"score {value!r} is not finite")
    return v


def _last_complete(data: bytes, quoted: bool) -> int:
    """Bytes of ``data`` (which starts at a record) up to the end of its last complete record."""
    return record_end_in(data, quoted)
