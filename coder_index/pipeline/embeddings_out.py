"""``classify --save-embeddings DIR``: the image embeddings of a run, in clip-retrieval's layout.

    DIR/
      img_emb/img_emb_{N}.npy          [rows, D] L2-normalised image embeddings (float16 or float32)
      metadata/metadata_{N}.parquet    row-aligned: image_path (the row's path in OUT), caption,
                                       key, shard, json (a shard sample's sidecars; else null)
      embeddings.json                  dtype, dim, model fingerprint, the OUT they belong to
      .staging/                        the part being written (a run in progress)

The same layout clip-retrieval's ``inference`` writes and its back end, autofaiss and
``coder-index corpus build --embeddings`` read.

Written as the run goes and resumable with it. Per batch of rows: embeddings and metadata are
appended (and fsynced) to the staging part *before* the batch's prediction rows are written, and a
full part (``part_rows``) becomes ``img_emb_N.npy`` + ``metadata_N.parquet`` (written aside,
renamed) only *after* them. So whatever a kill interrupts, the parts hold only rows OUT holds, and
the staging part at least those; a resumed run first turns the staging part into a part, keeping
exactly the rows OUT holds, so no row is lost or saved twice. Another model, dtype or OUT is refused
(``embeddings.json``), under DIR's own lock.

**DIR in an object store** (``s3://bucket/emb/``, ``gs://...``, anything fsspec writes): the parts,
their metadata and ``embeddings.json`` go there, each written once as a whole object (part files are
immutable, which suits an object store; the ``.npy``, written last, marks a part), in the same order.
The staging part and the lock stay on the local disk, beside OUT (``OUT.embeddings-staging/``), since
an object store has neither appends nor locks: a kill anywhere still leaves one embedding per row
after the rerun. The predictions file stays local.
"""

from __future__ import annotations

import io
import json
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from coder_index.core.atomic import atomic_write_bytes, atomic_write_json, fsync_dir
from coder_index.core.errors import InputFormatError
from coder_index.core.faults import crash_point
from coder_index.core.locking import FileLock
from coder_index.core.remote import RemoteError, filesystem, is_remote, public_url, redacted

FORMAT = "coder-index/image-embeddings"
DTYPES = ("float16", "float32")
PART_ROWS = 100_000  # rows per img_emb_N.npy (clip-retrieval writes partitions of similar sizes)
_PART = re.compile(r"^img_emb_(\d+)\.npy$")
META_COLUMNS = ("image_path", "caption", "key", "shard", "json")


# ---------------------------------------------------------------------------------------------- where parts go
class LocalParts:
    """DIR on the local disk: files written aside, fsynced and renamed."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.name = str(directory)

    def prepare(self) -> None:
        if self.dir.exists() and not self.dir.is_dir():
            raise InputFormatError(f"--save-embeddings {self.dir} is a file; give a folder")
        self.dir.mkdir(parents=True, exist_ok=True)
        for sub in ("img_emb", "metadata"):
            (self.dir / sub).mkdir(exist_ok=True)

    def entries(self) -> list[str]:
        return [p.name for p in self.dir.iterdir()] if self.dir.is_dir() else []

    def names(self, sub: str) -> list[str]:
        return [p.name for p in (self.dir / sub).iterdir()] if (self.dir / sub).is_dir() else []

    def exists(self, rel: str) -> bool:
        return (self.dir / rel).exists()

    def read_bytes(self, rel: str) -> bytes:
        return (self.dir / rel).read_bytes()

    def write(self, rel: str, data: bytes) -> None:
        atomic_write_bytes(self.dir / rel, data)

    def remove(self, rel: str) -> None:
        import shutil

        p = self.dir / rel
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)

    def rows(self, rel: str) -> int:
        return int(np.load(self.dir / rel, mmap_mode="r").shape[0])

    def sync(self, sub: str) -> None:
        fsync_dir(self.dir / sub)


class RemoteParts:
    """DIR in an object store (fsspec): each file one whole object, read back by its header."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.name = public_url(self.url)
        self.fs, self.root = filesystem(self.url)
        self.root = self.root.rstrip("/")

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise RemoteError(f"--save-embeddings {self.name}: could not {what} ({redacted(str(exc), self.url)})") \
                from None

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def prepare(self) -> None:
        pass  # an object store has no folders to make

    def entries(self) -> list[str]:
        try:
            found = self._call("list it", self.fs.ls, self.root, False)
        except FileNotFoundError:
            return []
        return sorted({str(p).rstrip("/").rsplit("/", 1)[-1] for p in found})

    def names(self, sub: str) -> list[str]:
        try:
            found = self._call("list it", self.fs.ls, self._path(sub), False)
        except FileNotFoundError:
            return []
        return [str(p).rstrip("/").rsplit("/", 1)[-1] for p in found]

    def exists(self, rel: str) -> bool:
        return bool(self._call("look into it", self.fs.exists, self._path(rel)))

    def read_bytes(self, rel: str) -> bytes:
        return self._call("read it", self.fs.cat_file, self._path(rel))

    def write(self, rel: str, data: bytes) -> None:
        self._call("write to it", self.fs.pipe_file, self._path(rel), data)

    def remove(self, rel: str) -> None:
        try:
            if self.fs.exists(self._path(rel)):
                self._call("remove from it", self.fs.rm, self._path(rel), True)
        except FileNotFoundError:
            pass

    def rows(self, rel: str) -> int:
        def header() -> int:
            with self.fs.open(self._path(rel), "rb") as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, _, _ = read(f)
                return int(shape[0])

        return self._call("read a part's header", header)

    def sync(self, sub: str) -> None:
        pass  # each object is durable once written


def parts_for(directory: str | Path) -> LocalParts | RemoteParts:
    return RemoteParts(str(directory)) if is_remote(str(directory)) else LocalParts(Path(directory))


# ---------------------------------------------------------------------------------------------- the saver
class EmbeddingSaver:
    """Open with the run's settings; ``append`` before a batch's rows are written, ``commit`` after."""

    def __init__(self, directory: str | Path, *, out: Path, dim: int, model: dict[str, Any], dtype: str = "float16",
                 part_rows: int = PART_ROWS, overwrite: bool = False) -> None:
        if dtype not in DTYPES:
            raise InputFormatError(f"--embeddings-dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.parts = parts_for(directory)
        self.dir = self.parts.name  # what messages and the summary show
        self.out, self.dim, self.model, self.dtype = str(Path(out).resolve()), dim, model, dtype
        self.part_rows = part_rows
        self.overwrite = overwrite
        if isinstance(self.parts, LocalParts):
            self.staging = self.parts.dir / ".staging"
            self._lock_path = self.parts.dir / ".lock"
        else:  # an object store has no appends and no locks: the staging part waits beside OUT
            self.staging = Path(self.out + ".embeddings-staging")
            self._lock_path = Path(self.out + ".embeddings-staging.lock")
        self._lock: FileLock | None = None

    # ------------------------------------------------------------------ lifecycle
    def open(self, done: set[str]) -> EmbeddingSaver:
        """Take DIR's lock, check or record its settings, and settle a staging part left by a killed
        run (keeping the rows in ``done``: what OUT holds)."""
        self.parts.prepare()
        self._lock = FileLock(self._lock_path, f"--save-embeddings {self.dir}", remove=True).acquire()
        try:
            self._settle_settings()
            self.staging.mkdir(exist_ok=True)
            self._drop_unpaired_metadata()
            self._finish_staging(keep=done)
        except BaseException:
            self.close(finish=False)  # a refused or failed open leaves what is staged as it was
            raise
        return self

    @property
    def saved(self) -> int:
        """Rows whose embeddings DIR holds (in parts and staged)."""
        return self._rows_in_parts() + self._staged_rows()

    def close(self, finish: bool = True) -> None:
        """Turn what is staged into a last part (``finish``; after a failed run the staged rows may
        run ahead of OUT's, and the next run settles them against OUT), then release DIR."""
        try:
            if finish and self._lock is not None and self.staging.is_dir():
                self._finish_staging(keep=None)
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def _settle_settings(self) -> None:
        want = {"format": FORMAT, "version": 1, "dtype": self.dtype, "dim": self.dim, "model": self.model,
                "out": self.out, "normalized": True}
        entries = self.parts.entries()
        ours = [p for p in entries if p in ("img_emb", "metadata", ".staging", "embeddings.json")]
        have = None
        if "embeddings.json" in entries:
            try:
                have = json.loads(self.parts.read_bytes("embeddings.json").decode("utf-8"))
            except (OSError, ValueError) as exc:
                if not self.overwrite:
                    raise InputFormatError(f"{self.dir}/embeddings.json is unreadable ({exc}); move the folder away, "
                                           "or pass --overwrite to start the run and its embeddings afresh") from None
        if self.overwrite and (have is None or have.get("out") == self.out):
            for p in ours:  # --overwrite restarts this OUT's embeddings, never another OUT's
                self.parts.remove(p)
            _remove(self.staging)
            self.parts.prepare()
            have = None
        if have is not None:
            diff = [k for k in ("format", "dtype", "dim", "model", "out") if have.get(k) != want[k]]
            if diff:
                raise InputFormatError(
                    f"--save-embeddings {self.dir} holds embeddings of other settings ({', '.join(diff)} differ: "
                    f"{', '.join(f'{k} {have.get(k)!r} there, {want[k]!r} asked' for k in diff if k != 'model')}"
                    f"{' and another model' if 'model' in diff else ''}); choose another folder"
                    f"{'' if 'out' in diff else ', or pass --overwrite to start the run and its embeddings afresh'}")
            return
        if [p for p in self.parts.entries() if not p.startswith(".") and p not in ("img_emb", "metadata")] or \
                self.parts.names("img_emb") or self.parts.names("metadata"):
            raise InputFormatError(f"--save-embeddings {self.dir} is not empty and holds no embeddings.json; choose an "
                                   "empty or new folder")
        record = {**want, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if isinstance(self.parts, LocalParts):
            atomic_write_json(self.parts.dir / "embeddings.json", record)
        else:
            self.parts.write("embeddings.json", (json.dumps(record, indent=2) + "\n").encode("utf-8"))

    # ------------------------------------------------------------------ writing
    def append(self, paths: list[str], emb: np.ndarray, samples: Iterable[Any]) -> None:
        """Stage a batch (``samples``: the rows' sources, for shard captions and sidecars)."""
        if not len(paths):
            return
        vecs = np.ascontiguousarray(emb, dtype=np.float32)
        vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        rows = []
        for path, src in zip(paths, samples, strict=True):
            rows.append({"image_path": path, "caption": getattr(src, "caption", None),
                         "key": getattr(src, "key", None), "shard": getattr(src, "container", None),
                         "json": getattr(src, "meta", None)})
        emb_file, meta_file = self._staging_files()
        with open(emb_file, "ab") as f:
            f.write(vecs.astype(self.dtype).tobytes())
            f.flush()
            os.fsync(f.fileno())
        with open(meta_file, "ab") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        crash_point("embeddings.staged")  # tests: killed with the batch staged, its rows not yet written

    def commit(self) -> None:
        """After the batch's prediction rows are written: a full staging part becomes a part."""
        if self._staged_rows() >= self.part_rows:
            self._finish_staging(keep=None)

    # ------------------------------------------------------------------ parts
    def _staging_files(self) -> tuple[Path, Path]:
        """The staging part's two files, named after the part they become (so that a part already
        written from them is recognised, and never written twice)."""
        found = self._staged()
        n = found[0] if found else self._next_part()
        return self.staging / f"emb_{n}.bin", self.staging / f"meta_{n}.jsonl"

    def _staged(self) -> list[int]:
        nums = {int(m.group(1)) for p in self.staging.iterdir() if (m := re.match(r"^(?:emb|meta)_(\d+)\.", p.name))} \
            if self.staging.is_dir() else set()
        return sorted(nums)

    def _staged_rows(self) -> int:
        rows = 0
        for n in self._staged():
            p = self.staging / f"emb_{n}.bin"
            rows += p.stat().st_size // (self.dim * np.dtype(self.dtype).itemsize) if p.exists() else 0
        return rows

    def _rows_in_parts(self) -> int:
        return sum(self.parts.rows(f"img_emb/{name}") for name in self.parts.names("img_emb") if _PART.match(name))

    def _drop_unpaired_metadata(self) -> None:
        """A metadata_N.parquet without its img_emb_N.npy is a part a kill interrupted (the .npy is
        written last): its rows are still staged, so it goes."""
        parts = set(self.parts.names("img_emb"))
        for name in self.parts.names("metadata"):
            if name.startswith("metadata_") and name.endswith(".parquet"):
                n = name[len("metadata_"):-len(".parquet")]
                if f"img_emb_{n}.npy" not in parts:
                    self.parts.remove(f"metadata/{name}")

    def _next_part(self) -> int:
        nums = [int(m.group(1)) for name in self.parts.names("img_emb") if (m := _PART.match(name))]
        return max(nums) + 1 if nums else 0

    def _finish_staging(self, keep: set[str] | None) -> None:
        """Staged rows -> img_emb_N.npy + metadata_N.parquet (only those in ``keep`` when given; a row
        staged twice, by a killed run and again, once). A part already written from them (a kill
        before the staging was cleared) is not written again."""
        for n in self._staged():
            emb_file = self.staging / f"emb_{n}.bin"
            meta_file = self.staging / f"meta_{n}.jsonl"
            if not self.parts.exists(f"img_emb/img_emb_{n}.npy"):
                self._part_from_staging(n, emb_file, meta_file, keep)
            crash_point("embeddings.part_written")  # tests: killed with the part written, the staging not cleared
            for f in (emb_file, meta_file):
                f.unlink(missing_ok=True)
            fsync_dir(self.staging)

    def _part_from_staging(self, n: int, emb_file: Path, meta_file: Path, keep: set[str] | None) -> None:
        width = self.dim * np.dtype(self.dtype).itemsize
        raw = emb_file.read_bytes() if emb_file.exists() else b""
        rows = []
        for line in (meta_file.read_bytes().split(b"\n") if meta_file.exists() else []):
            try:
                rows.append(json.loads(line))
            except ValueError:
                break  # a line cut by a kill: what follows it was not staged either
        count = min(len(rows), len(raw) // width)
        vecs = np.frombuffer(raw[: count * width], dtype=self.dtype).reshape(count, self.dim)
        chosen, seen = [], set()
        for i, r in enumerate(rows[:count]):
            p = r["image_path"]
            if (keep is None or p in keep) and p not in seen:
                seen.add(p)
                chosen.append(i)
        if chosen:
            self._write_part(n, vecs[chosen], [rows[i] for i in chosen])

    def _write_part(self, n: int, vecs: np.ndarray, rows: list[dict[str, Any]]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({c: pa.array([r.get(c) for r in rows], type=pa.string()) for c in META_COLUMNS})
        meta = io.BytesIO()
        pq.write_table(table, meta)
        self.parts.write(f"metadata/metadata_{n}.parquet", meta.getvalue())
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(vecs), allow_pickle=False)
        crash_point("embeddings.metadata_written")  # tests: killed between the two files of a part
        self.parts.write(f"img_emb/img_emb_{n}.npy", buf.getvalue())  # last: it marks the part
        self.parts.sync("metadata")


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
