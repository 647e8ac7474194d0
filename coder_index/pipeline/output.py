"""Result and error files that a rerun resumes: one row per image in the end, none lost or doubled.

Rows are appended a batch at a time and flushed + fsynced; a run killed mid-write can leave at most
one partial last line, which ``open`` cuts off before appending.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from ..errors import InputFormatError

_ENC = {"encoding": "utf-8", "errors": "surrogateescape", "newline": ""}


def _cut_partial_last_line(path: Path) -> None:
    with open(path, "rb+") as f:
        data_end = f.seek(0, os.SEEK_END)
        if data_end == 0:
            return
        f.seek(data_end - 1)
        if f.read(1) == b"\n":
            return
        # scan back for the last newline; everything after it is an interrupted write
        pos, chunk = data_end, 65536
        while pos > 0:
            start = max(0, pos - chunk)
            f.seek(start)
            block = f.read(pos - start)
            nl = block.rfind(b"\n")
            if nl >= 0:
                f.truncate(start + nl + 1)
                return
            pos = start
        f.truncate(0)


class _AppendFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._f: Any = None

    def _open(self) -> None:
        if self._f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a", **_ENC)

    def _append(self, text: str) -> None:
        self._open()
        self._f.write(text)
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class ResultWriter(_AppendFile):
    """CSV (``.csv``) or JSON Lines (``.jsonl``) predictions, chosen by the file's extension."""

    def __init__(self, path: str | Path, top_k: int) -> None:
        super().__init__(Path(path))
        suffix = self.path.suffix.lower()
        if suffix not in (".csv", ".jsonl"):
            raise InputFormatError(f"--out {self.path}: use a .csv or .jsonl file name")
        self.format = suffix[1:]
        self.top_k = top_k
        self.header = ["path", "label", "score", "method"] + [
            f"{c}_{i}" for i in range(2, top_k + 1) for c in ("label", "score")]

    def done_paths(self) -> set[str]:
        """Paths already written by an earlier run (after cutting a partial last line)."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return set()
        _cut_partial_last_line(self.path)
        with open(self.path, **_ENC) as f:
            if self.format == "jsonl":
                done = set()
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            done.add(json.loads(line)["path"])
                        except (json.JSONDecodeError, KeyError, TypeError):
                            raise InputFormatError(f"{self.path}:{lineno} is not a coder-index result row; "
                                                   "choose a new --out file") from None
                return done
            reader = csv.reader(f)
            header = next(reader, None)
            if header != self.header:
                raise InputFormatError(
                    f"{self.path} exists with columns {header[:6] if header else None}..., which do not match "
                    f"this run (--top-k {self.top_k}); resume with the same options or choose a new --out")
            return {row[0] for row in reader if row}

    def write(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        buf = io.StringIO()
        if self.format == "jsonl":
            for r in rows:
                buf.write(json.dumps(r, ensure_ascii=False) + "\n")
        else:
            w = csv.writer(buf, lineterminator="\n")
            if not self.path.exists() or self.path.stat().st_size == 0:
                w.writerow(self.header)
            for r in rows:
                flat = [r["path"], r["label"], f"{r['score']:.6f}", r["method"]]
                for t in r["top_k"][1:]:
                    flat += [t["label"], f"{t['score']:.6f}"]
                flat += [""] * (len(self.header) - len(flat))
                w.writerow(flat)
        self._append(buf.getvalue())


class ErrorWriter(_AppendFile):
    """``<out>.errors.csv``: path,error for every file that produced no prediction."""

    header = ["path", "error"]

    def done_paths(self) -> set[str]:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return set()
        _cut_partial_last_line(self.path)
        with open(self.path, **_ENC) as f:
            reader = csv.reader(f)
            next(reader, None)
            return {row[0] for row in reader if row}

    def write(self, errors: list[tuple[str, str]]) -> None:
        if not errors:
            return
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        if not self.path.exists() or self.path.stat().st_size == 0:
            w.writerow(self.header)
        w.writerows(errors)
        self._append(buf.getvalue())


def errors_path_for(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".errors.csv")
