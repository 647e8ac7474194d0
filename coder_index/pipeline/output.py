"""Result and error files that a rerun resumes: one row per image in the end, none lost or doubled.

Rows are appended a batch at a time, flushed and fsynced. A run killed mid-write leaves at most one
partial record at the end, which the next run cuts off before appending: the cut is placed after
the last *complete* record, correctly at every byte offset, quoted fields with newlines included.

Any file name round-trips, whatever it holds (newline, carriage return, tab, quotes, commas, bytes
that are not UTF-8):

* CSV: every text field is quoted (``csv.QUOTE_NONNUMERIC``), so a newline or carriage return in a
  name stays inside its field. A record ends at a newline preceded by an even number of quote
  characters (a quote inside a field is doubled), which is how the last complete record is found.
  Names that are not UTF-8 are written as their raw bytes (read them with
  ``errors="surrogateescape"``, as Python does for such file names).
* JSONL: one JSON object per line; JSON escapes control characters, and a name's undecodable bytes
  are written as the ``\\udcXX`` escapes of Python's surrogateescape, so the file is valid UTF-8.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path
from typing import Any

from coder_index.core.atomic import translate_disk_full
from coder_index.core.errors import InputFormatError
from coder_index.core.faults import armed
from coder_index.pipeline.record_ends import last_record_end, record_end_in  # noqa: F401 - re-exported

_ENC = {"encoding": "utf-8", "errors": "surrogateescape", "newline": ""}
_SURROGATE = re.compile("[\ud800-\udfff]")


def escape_surrogates(text: str) -> str:
    """JSON text with a name's undecodable bytes (Python's lone surrogates) as ``\\udcXX`` escapes:
    valid UTF-8 that ``json.loads`` reads back to the same name."""
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def json_line(obj: dict[str, Any]) -> str:
    """One JSON object as a line of valid UTF-8 text, whatever the strings in it hold."""
    return escape_surrogates(json.dumps(obj, ensure_ascii=False)) + "\n"


def repair_tail(path: Path, quoted: bool) -> int:
    """Cut an interrupted last record off ``path``; returns the number of bytes removed."""
    if not path.exists():
        return 0
    size = path.stat().st_size
    keep = last_record_end(path, quoted)
    if keep < size:
        with open(path, "rb+") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    return size - keep


class _AppendFile:
    quoted = True

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f: Any = None

    def _open(self) -> None:
        if self._f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a", **_ENC)

    def _append(self, text: str) -> None:
        with translate_disk_full(self.path):
            self._open()
            if armed("output.mid_record"):  # the machine dies in the middle of a record
                data = text.encode("utf-8", "surrogateescape")
                self._f.buffer.write(data[: max(1, len(data) // 2)])
                self._f.buffer.flush()
                os.fsync(self._f.fileno())
                os.kill(os.getpid(), 9)
            try:
                self._f.write(text)
                self._f.flush()
                os.fsync(self._f.fileno())
            except BaseException:
                # a half-written batch must not stay: it would be cut on resume anyway, and a full
                # disk must leave the file as it was
                self._f = None
                repair_tail(self.path, self.quoted)
                raise

    def close(self) -> None:
        if self._f is not None:
            try:
                self._f.close()
            except OSError:
                pass
            self._f = None

    def _empty(self) -> bool:
        return not self.path.exists() or self.path.stat().st_size == 0


def _csv_writer(buf: io.StringIO) -> Any:
    return csv.writer(buf, quoting=csv.QUOTE_NONNUMERIC, lineterminator="\n")


class ResultWriter(_AppendFile):
    """CSV (``.csv``) or JSON Lines (``.jsonl``) predictions, chosen by the file's extension."""

    def __init__(self, path: str | Path, top_k: int, stage1: bool = False) -> None:
        """``stage1``: the rows are CODER*'s: two more columns, ``stage1_label`` and ``stage1_score``,
        CODER's own first class and its probability (what the rerank started from)."""
        super().__init__(Path(path))
        suffix = self.path.suffix.lower()
        if suffix not in (".csv", ".jsonl"):
            raise InputFormatError(f"--out {self.path}: use a .csv or .jsonl file name")
        self.format = suffix[1:]
        self.quoted = self.format == "csv"
        self.top_k = top_k
        self.stage1 = stage1
        self.header = ["path", "label", "score", "method"] + (["stage1_label", "stage1_score"] if stage1 else []) + [
            f"{c}_{i}" for i in range(2, top_k + 1) for c in ("label", "score")]

    def done_paths(self) -> set[str]:
        """Paths already written by an earlier run (after cutting an interrupted last record), read by
        the one reader of predictions files (``predictions_file``)."""
        from coder_index.pipeline.predictions_file import BadRecord, PredictionsReader, read_rows

        if self._empty():
            return set()
        repair_tail(self.path, self.quoted)
        reader = PredictionsReader(self.path, strict=True)
        try:
            done = {r.path for r in read_rows(self.path, paths_only=True, reader=reader)}
        except BadRecord as exc:
            raise InputFormatError(f"{self.path}:{exc.line} is not a coder-index result row; choose a new --out "
                                   "(or --overwrite)") from None
        if reader.header is not None and reader.header != self.header:
            why = "; CODER* rows have stage1_label and stage1_score since coder-index 0.4" if self.stage1 else ""
            raise InputFormatError(
                f"{self.path} exists with columns {reader.header[:6]}..., which do not match this run (--top-k "
                f"{self.top_k}{why}); resume with the same options, --overwrite, or choose a new --out")
        return done

    def write(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        buf = io.StringIO()
        if self.format == "jsonl":
            for r in rows:
                buf.write(json_line(r))
        else:
            w = _csv_writer(buf)
            if self._empty():
                w.writerow(self.header)
            for r in rows:
                flat: list[Any] = [r["path"], r["label"], round(float(r["score"]), 6), r["method"]]
                if self.stage1:
                    s1 = r.get("stage1") or {}
                    flat += [s1.get("label", ""), round(float(s1["score"]), 6) if "score" in s1 else ""]
                for t in r["top_k"][1:]:
                    flat += [t["label"], round(float(t["score"]), 6)]
                flat += [""] * (len(self.header) - len(flat))
                w.writerow(flat)
        self._append(buf.getvalue())


class ErrorWriter(_AppendFile):
    """``<out>.errors.csv``: ``path,error,retry`` for everything that produced no prediction.

    ``retry`` is ``yes`` for what could not be *read* (a missing file or shard, a 404, a command that
    failed, a damaged stream, retries spent): the next run drops these rows and tries again. Rows
    without it (``no``, or files of coder-index 0.4 and before, which have two columns) are final: an
    image that does not decode, a sample without an image, a FIFO named like an image."""

    header = ["path", "error", "retry"]

    def _rows(self) -> list[list[str]]:
        repair_tail(self.path, True)
        with open(self.path, **_ENC) as f:
            reader = csv.reader(f)
            next(reader, None)
            return [row for row in reader if row]

    def done_paths(self) -> set[str]:
        """What a rerun skips: the final rows (those to retry are not done)."""
        if self._empty():
            return set()
        return {row[0] for row in self._rows() if not _retried(row)}

    def drop_retried(self) -> list[str]:
        """Remove the rows a rerun retries (rewritten atomically, in the current layout); their paths."""
        if self._empty():
            return []
        with open(self.path, **_ENC) as f:
            header = next(csv.reader(f), None)
        rows = self._rows()
        dropped = [row[0] for row in rows if _retried(row)]
        if not dropped and header == self.header:
            return []
        from coder_index.core.atomic import atomic_write_bytes

        buf = io.StringIO()
        w = _csv_writer(buf)
        w.writerow(self.header)
        w.writerows([(row[0], row[1] if len(row) > 1 else "", "no") for row in rows if not _retried(row)])
        self.close()
        with translate_disk_full(self.path):
            atomic_write_bytes(self.path, buf.getvalue().encode("utf-8", "surrogateescape"))
        return dropped

    def write(self, errors: list[tuple[str, str]], retry: bool = False) -> None:
        if not errors:
            return
        buf = io.StringIO()
        w = _csv_writer(buf)
        if self._empty():
            w.writerow(self.header)
        w.writerows([(p, reason, "yes" if retry else "no") for p, reason in errors])
        self._append(buf.getvalue())


def _retried(row: list[str]) -> bool:
    return len(row) > 2 and row[2] == "yes"


def errors_path_for(out: str | Path) -> Path:
    """``OUT.errors.csv`` (``p.csv`` -> ``p.csv.errors.csv``): outputs that differ only by their
    extension (``p.csv``, ``p.jsonl``) never share an errors file."""
    out = Path(out)
    return out.with_name(out.name + ".errors.csv")


def legacy_errors_path(out: str | Path) -> Path:
    """Where coder-index 0.2 wrote OUT's errors (``p.errors.csv``, shared by ``p.csv`` and ``p.jsonl``)."""
    out = Path(out)
    return out.with_name(out.stem + ".errors.csv")
