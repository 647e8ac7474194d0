"""Browse a predictions file (`classify --out`, .csv or .jsonl): filter, sort, page; find its images.

The file is read once into arrays (labels as ids, scores as a matrix) and then only its new complete
records as it grows (a classify run still writing to it); a file that shrank or was replaced is read
afresh. Filters and sorting are array operations over all rows.

Images are served only for paths the file lists, and only when they lie inside the inputs classify
read: the folder it classified, the directory it ran in for listed files, the shards it streamed
(``OUT.run.json`` records them), or ``images_root`` when one is given (it narrows, or replaces a
record an older classify did not write). A file is opened once, and the real path of the opened
descriptor is checked (not the name before opening), so ``../``, absolute paths elsewhere, links out
of the root and a folder swapped for such a link while a request runs are all refused, and what was
checked is what is read. A row ``SHARD/KEY`` is served from its shard when that shard is one classify
read (in place, compressed or by URL); a ``pipe:`` row is never run.

Every state of the predictions file is an answer, never a server error: rows that are not
predictions (a garbage line appended) are skipped and counted (``bad_lines``); a file deleted,
replaced by a directory or a FIFO while served keeps the rows already read, and says so
(``problem``); a file that was never readable is a clear 422.
"""

from __future__ import annotations

import io
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from coder_index.core.errors import InputFormatError
from coder_index.core.untrusted import NotARegularFile, open_regular_file
from coder_index.pipeline.predictions_file import PredictionsReader
from coder_index.pipeline.record_ends import last_record_end


class NotListed(Exception):
    """The path is not a row of the predictions file."""


class OutsideRoot(Exception):
    """The path resolves outside --images-root (``..``, an absolute path, or a symlink out of it)."""


@dataclass
class Page:
    total: int
    rows: list[dict[str, Any]]


class PredictionsFile:
    def __init__(self, path: Path, images_root: Path | None = None) -> None:
        from coder_index.pipeline.rows import RunRecord

        self.path = Path(path)
        try:
            self.record: Any = RunRecord.load(self.path)
        except InputFormatError:
            self.record = None
        dirs = self.record.working_dirs() if self.record is not None else []
        if images_root is not None:  # rows relative to it, and nothing outside it
            self.base = os.path.realpath(images_root)
            self.roots = [self.base]
        elif dirs:  # where classify ran: relative rows name files from there
            self.base = os.path.realpath(dirs[0])
            folders = [os.path.realpath(f) for f in self.record.roots()]
            kinds = {i.get("kind") for i in self.record.inputs}
            self.roots = folders + ([self.base] if "files" in kinds else [])  # listed files: from where it ran
        else:
            self.base = os.path.realpath(self.path.parent)
            self.roots = []
        self.root = self.base  # (older name)
        self.shards = self.record.shards() if self.record is not None else set()
        self._samples: Any = None
        self.format = self.path.suffix.lower().lstrip(".")
        if self.format not in ("csv", "jsonl"):
            raise InputFormatError(f"--predictions {self.path}: a classify output (.csv or .jsonl) is expected")
        self._lock = threading.Lock()
        self._reset()
        self.refresh()

    # ------------------------------------------------------------------ reading
    def _reset(self) -> None:
        self._ident: tuple[int, int] | None = None
        self._offset = 0
        self.paths: list[str] = []
        self._where: dict[str, int] = {}
        self.vocab: list[str] = []
        self._vocab_ids: dict[str, int] = {}
        self.methods: list[str] = []
        self._chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._changed_rows: list[np.ndarray] = []   # per record: the rerank put another class than stage 1's first
        self._arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._reader = PredictionsReader(self.path)  # lenient: the good rows stay browsable
        self.bad_lines = 0               # records that are not predictions: skipped, counted
        self.problem: str | None = None  # what happened to the file, when the rows served are older than it

    def refresh(self) -> None:
        """Read what was appended since the last call (or everything, if the file was replaced). The
        file is opened once (never followed into a FIFO); all reads come from that descriptor."""
        with self._lock:
            try:
                f = open_regular_file(self.path)
            except (NotARegularFile, IsADirectoryError):
                return self._unreadable("it is no longer a regular file (a directory, FIFO, socket or device)")
            except FileNotFoundError:
                return self._unreadable("it was deleted or moved")
            except OSError as exc:
                return self._unreadable(f"it cannot be opened ({exc.strerror or exc.__class__.__name__})")
            with f:
                st = os.fstat(f.fileno())
                ident = (st.st_dev, st.st_ino)
                if ident != self._ident or st.st_size < self._offset:
                    self._reset()
                    self._ident = ident
                self.problem = None
                if st.st_size == self._offset:
                    return None
                end = last_record_end(f, quoted=self.format == "csv")
                if end <= self._offset:
                    return None
                f.seek(self._offset)
                data = f.read(end - self._offset)
            # the one reader of predictions files: a record that is not a prediction is skipped and counted
            records = [(r.path, r.label, r.method, r.top, _changed_row(r.label, r.stage1, r.top))
                       for r in self._reader.rows(data)]
            self.bad_lines = self._reader.bad
            self._append(records)
            self._offset = end
            return None

    def _unreadable(self, why: str) -> None:
        """The file cannot be read now: keep serving the rows already read, saying why; with none read
        yet, a clear error (the API answers 422)."""
        if self._ident is None:
            raise InputFormatError(f"the predictions file {self.path.name} cannot be read: {why}")
        self.problem = f"{self.path.name}: {why}; showing the {len(self.paths)} rows read before"

    def _append(self, records: list[tuple[str, str, str, list[tuple[str, float]], bool]]) -> None:
        if not records:
            return
        k = max(len(r[3]) for r in records)
        ids = np.full((len(records), k), -1, np.int32)
        scores = np.full((len(records), k), np.nan, np.float64)
        methods = np.empty(len(records), np.int16)
        for n, (path, _label, method, top, _) in enumerate(records):
            self._where.setdefault(path, len(self.paths))
            self.paths.append(path)
            methods[n] = self._id(method, self.methods)
            for j, (lab, s) in enumerate(top):
                ids[n, j] = self._vocab_id(lab)
                scores[n, j] = s
        self._changed_rows.append(np.fromiter((r[4] for r in records), bool, len(records)))
        self._chunks.append((ids, scores, methods))
        self._arrays = None

    def _vocab_id(self, label: str) -> int:
        i = self._vocab_ids.get(label)
        if i is None:
            i = self._vocab_ids[label] = len(self.vocab)
            self.vocab.append(label)
        return i

    @staticmethod
    def _id(value: str, values: list[str]) -> int:
        if value not in values:
            values.append(value)
        return values.index(value)

    def _matrices(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._arrays is None:
            if not self._chunks:
                self._arrays = (np.zeros((0, 1), np.int32), np.zeros((0, 1)), np.zeros(0, np.int16))
            else:
                k = max(c[0].shape[1] for c in self._chunks)
                pad = [(np.pad(i, ((0, 0), (0, k - i.shape[1])), constant_values=-1),
                        np.pad(s, ((0, 0), (0, k - s.shape[1])), constant_values=np.nan), m)
                       for i, s, m in self._chunks]
                self._arrays = (np.concatenate([p[0] for p in pad]), np.concatenate([p[1] for p in pad]),
                                np.concatenate([p[2] for p in pad]))
                self._chunks = [self._arrays]
        return self._arrays

    # ------------------------------------------------------------------ queries
    def summary(self) -> dict[str, Any]:
        self.refresh()
        with self._lock:
            ids, scores, methods = self._matrices()
            counts = np.bincount(ids[:, 0], minlength=len(self.vocab)) if len(ids) else np.zeros(0, int)
            return {"file": self.path.name, "rows": len(self.paths), "bad_lines": self.bad_lines,
                    "problem": self.problem,
                    "labels": [{"label": self.vocab[i], "count": int(counts[i])}
                               for i in np.argsort(-counts, kind="stable") if counts[i]],
                    "methods": list(self.methods), "changed_by_rerank": int(self._changed_all().sum())}

    def page(self, *, label: str | None = None, min_score: float | None = None, max_score: float | None = None,
             method: str | None = None, changed: bool | None = None, path_contains: str | None = None,
             sort: str = "file", offset: int = 0, limit: int = 60) -> Page:
        self.refresh()
        with self._lock:
            ids, scores, methods = self._matrices()
            keep = np.ones(len(ids), bool)
            if label is not None:
                keep &= ids[:, 0] == self._vocab_ids.get(label, -2)
            if min_score is not None:
                keep &= scores[:, 0] >= min_score
            if max_score is not None:
                keep &= scores[:, 0] <= max_score
            if method is not None:
                keep &= methods == (self.methods.index(method) if method in self.methods else -2)
            if changed is not None:
                keep &= self._changed_all() == changed
            if path_contains:
                keep &= np.fromiter((path_contains in p for p in self.paths), bool, len(self.paths))
            rows = np.flatnonzero(keep)
            if sort in ("score", "-score"):
                order = np.argsort(scores[rows, 0], kind="stable")
                rows = rows[order[::-1]] if sort == "-score" else rows[order]
            elif sort != "file":
                raise ValueError(f"sort must be file, score (lowest first) or -score, got {sort!r}")
            chosen = rows[offset:offset + limit]
            changed_rows = self._changed_all()[chosen]
            return Page(len(rows), [self._row(int(r), ids, scores, methods, bool(c))
                                    for r, c in zip(chosen, changed_rows, strict=True)])

    def _row(self, r: int, ids: np.ndarray, scores: np.ndarray, methods: np.ndarray, changed: bool) -> dict[str, Any]:
        top = [{"label": self.vocab[i], "score": float(s)} for i, s in zip(ids[r], scores[r], strict=True) if i >= 0]
        return {"row": r, "path": display_text(self.paths[r]), "label": top[0]["label"], "score": top[0]["score"],
                "method": self.methods[methods[r]], "top_k": top, "changed": changed}

    def _changed_all(self) -> np.ndarray:
        """Per row: the rerank chose another class than stage 1's first."""
        if len(self._changed_rows) > 1:
            self._changed_rows = [np.concatenate(self._changed_rows)]
        return self._changed_rows[0] if self._changed_rows else np.zeros(0, bool)

    # ------------------------------------------------------------------ images
    def listed_path(self, listed: str | None = None, row: int | None = None) -> str:
        """A listed image's path as the file lists it, named by its path or by its row (rows name
        files whose names are not valid UTF-8); NotListed otherwise."""
        self.refresh()
        with self._lock:
            if row is not None:
                if not 0 <= row < len(self.paths):
                    raise NotListed(str(row))
                return self.paths[row]
            if listed is None or listed not in self._where:
                raise NotListed(listed)
            return listed

    def servable(self) -> str | None:
        """None when rows can be served; else why not, with the fix (said once, at start)."""
        if not self.roots and not self.shards:
            return (f"{self.path}'s run record says nothing of what classify read (an older classify wrote it): "
                    "pass --images-root DIR, the directory classify ran in, to show its images")
        if not self.paths:
            return None
        try:
            f, _ = self.open_image(row=0)
            f.close()
        except OutsideRoot:
            return (f"the rows of {self.path} (e.g. {self.paths[0]}) lie outside what classify read "
                    f"({', '.join(self.roots) or 'no folder'}): their images are not shown; pass --images-root DIR "
                    "(the directory classify ran in) if they were moved")
        except Exception as exc:  # a missing file: others may still be there
            return f"the first row's image cannot be read ({exc}); rows whose images are gone show no thumbnail"
        return None

    def open_image(self, listed: str | None = None, row: int | None = None) -> tuple[Any, str]:
        """(open binary file, path as listed) of a listed image that lies inside the inputs classify
        read. A file is opened once, then the real path of the opened descriptor is checked against
        the roots: a link or folder swapped in between cannot make it read anything else. A shard's
        sample comes from its shard, when classify read that shard. NotListed / OutsideRoot
        otherwise; OSError (missing, unreadable) and NotARegularFile pass through."""
        listed = self.listed_path(listed, row)
        sample = self._shard_sample(listed)
        if sample is not None:
            return sample, listed
        if "://" in listed or listed.startswith("pipe:") or not self.roots:
            raise OutsideRoot(listed)  # a URL or a command named by a row is never fetched or run
        full = listed if os.path.isabs(listed) else os.path.join(self.base, listed)
        if not any(_inside(os.path.normpath(full), r) for r in self.roots):
            raise OutsideRoot(listed)  # '..' leads out of the roots by its letters alone: nothing is opened
        try:
            f = open_regular_file(full)
        except ValueError:  # an embedded NUL byte
            raise OutsideRoot(listed) from None
        try:
            real = _real_path_of(f.fileno(), full)
            if real is None or not any(_inside(real, r) for r in self.roots):
                raise OutsideRoot(listed)
        except BaseException:
            f.close()
            raise
        return f, listed

    def _shard_sample(self, listed: str) -> Any:
        """A BytesIO of the sample ``SHARD/KEY`` when its shard is one classify read, else None."""
        from coder_index.pipeline.rows import split_shard_row

        found = split_shard_row(listed)
        if found is None or found[0] not in self.shards:
            return None
        shard, key = found
        if shard.startswith("pipe:"):
            raise OutsideRoot(listed)
        if self._samples is None:
            self._samples = _SampleCache(self.base, self.record.parquet_options() if self.record else None)
        return io.BytesIO(self._samples.get(shard, key))


def _changed_row(label: str, stage1: str | None, top: list[tuple[str, float]]) -> bool:
    """Whether the rerank changed a row: its label is not stage 1's first (``stage1``, written since
    0.4); for files written before, whose CODER* rows kept stage-1 scores, a first score below the
    second."""
    if stage1 is not None:
        return label != stage1
    return len(top) > 1 and top[0][1] < top[1][1]


def _inside(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:
        return False


class _SampleCache:
    """Samples of the containers served: a local tar's members by offset (its table read once), a
    streamed shard's images kept as they pass, within a byte budget, so that a page of thumbnails
    from one shard does not read it once per image; a parquet row found by its key."""

    BUDGET = 128 << 20

    def __init__(self, base: str, parquet: Any = None) -> None:
        import collections

        self.base, self.parquet = base, parquet
        self.tables: collections.OrderedDict[str, dict[str, tuple[int, int]]] = collections.OrderedDict()
        self.images: collections.OrderedDict[tuple[str, str], bytes] = collections.OrderedDict()
        self.size = 0
        self.lock = threading.Lock()

    def get(self, shard: str, key: str) -> bytes:
        from coder_index.core.decode import ImageDecodeError
        from coder_index.core.remote import is_remote, open_stream
        from coder_index.pipeline.sources.base import Sample
        from coder_index.pipeline.sources.lookup import container_image
        from coder_index.pipeline.sources.parquet import is_parquet_name
        from coder_index.pipeline.sources.tar_samples import tar_samples

        path = shard if is_remote(shard) or os.path.isabs(shard) else os.path.join(self.base, shard)
        with self.lock:
            if (shard, key) in self.images:
                self.images.move_to_end((shard, key))
                return self.images[(shard, key)]
        if is_parquet_name(shard.split("?", 1)[0]):
            return container_image(path, key, self.parquet)
        if not is_remote(path) and not path.lower().endswith((".tar.gz", ".tgz")):
            table = self._table(path)
            if key not in table:
                raise ImageDecodeError(f"no sample {key} with an image in the shard")
            offset, size = table[key]
            with open_regular_file(path) as f:
                f.seek(offset)
                return f.read(size)
        wanted = None
        with open_stream(path) as stream:
            for event in tar_samples(stream, shard, seekable=False):
                if isinstance(event, Sample) and event.data is not None:
                    self._keep((shard, event.key or ""), event.data)
                    if event.key == key:
                        wanted = event.data
        if wanted is None:
            raise ImageDecodeError(f"no sample {key} with an image in the shard")
        return wanted

    def _keep(self, k: tuple[str, str], data: bytes) -> None:
        with self.lock:
            self.images[k] = data
            self.size += len(data)
            while self.size > self.BUDGET and self.images:
                _, old = self.images.popitem(last=False)
                self.size -= len(old)

    def _table(self, path: str) -> dict[str, tuple[int, int]]:
        import tarfile

        from coder_index.pipeline.sources.tar_samples import is_image_ext, split_key

        with self.lock:
            if path in self.tables:
                self.tables.move_to_end(path)
                return self.tables[path]
        table: dict[str, tuple[int, int]] = {}
        with open_regular_file(path) as f, tarfile.open(fileobj=f, mode="r:") as tf:
            for info in tf:
                k, ext = split_key(info.name)
                if info.isreg() and is_image_ext(ext) and k not in table:
                    table[k] = (info.offset_data, info.size)
        with self.lock:
            self.tables[path] = table
            while len(self.tables) > 16:
                self.tables.popitem(last=False)
        return table


def _real_path_of(fd: int, opened: str) -> str | None:
    """Where the opened descriptor's file is, from the kernel (Linux /proc, macOS F_GETPATH); else
    None unless the name still leads to the very file opened (same device and inode)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        pass
    try:
        import fcntl
    except ImportError:  # Windows
        fcntl = None  # type: ignore[assignment]
    if fcntl is not None and hasattr(fcntl, "F_GETPATH"):
        try:
            return fcntl.fcntl(fd, fcntl.F_GETPATH, bytes(1024)).rstrip(b"\0").decode("utf-8", "surrogateescape")
        except OSError:
            return None
    real = os.path.realpath(opened)
    a, b = os.fstat(fd), os.stat(real)
    return real if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) and stat.S_ISREG(b.st_mode) else None


def display_text(text: str) -> str:
    """``text`` as valid Unicode for JSON: bytes of a file name that were not UTF-8 (held as lone
    surrogates, Python's surrogateescape) shown as U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape" if _escaped_only(text) else "surrogatepass").decode(
            "utf-8", "replace")


def _escaped_only(text: str) -> bool:
    return all(not 0xD800 <= ord(ch) <= 0xDFFF or 0xDC80 <= ord(ch) <= 0xDCFF for ch in text)
