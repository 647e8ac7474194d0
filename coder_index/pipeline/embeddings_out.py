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
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from coder_index.core.atomic import atomic_write_bytes, atomic_write_json, fsync_dir, temp_path
from coder_index.core.errors import InputFormatError
from coder_index.core.faults import crash_point
from coder_index.core.locking import FileLock

FORMAT = "coder-index/image-embeddings"
DTYPES = ("float16", "float32")
PART_ROWS = 100_000  # rows per img_emb_N.npy (clip-retrieval writes partitions of similar sizes)
_PART = re.compile(r"^img_emb_(\d+)\.npy$")
META_COLUMNS = ("image_path", "caption", "key", "shard", "json")


class EmbeddingSaver:
    """Open with the run's settings; ``append`` before a batch's rows are written, ``commit`` after."""

    def __init__(self, directory: str | Path, *, out: Path, dim: int, model: dict[str, Any], dtype: str = "float16",
                 part_rows: int = PART_ROWS, overwrite: bool = False) -> None:
        if dtype not in DTYPES:
            raise InputFormatError(f"--embeddings-dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.dir = Path(directory)
        self.out, self.dim, self.model, self.dtype = str(Path(out).resolve()), dim, model, dtype
        self.part_rows = part_rows
        self.overwrite = overwrite
        self._lock: FileLock | None = None

    # ------------------------------------------------------------------ lifecycle
    def open(self, done: set[str]) -> EmbeddingSaver:
        """Take DIR's lock, check or record its settings, and settle a staging part left by a killed
        run (keeping the rows in ``done``: what OUT holds)."""
        if self.dir.exists() and not self.dir.is_dir():
            raise InputFormatError(f"--save-embeddings {self.dir} is a file; give a folder")
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(self.dir / ".lock", f"--save-embeddings {self.dir}", remove=True).acquire()
        try:
            self._settle_settings()
            for sub in ("img_emb", "metadata", ".staging"):
                (self.dir / sub).mkdir(exist_ok=True)
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
            if finish and self._lock is not None and (self.dir / ".staging").is_dir():
                self._finish_staging(keep=None)
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def _settle_settings(self) -> None:
        record = self.dir / "embeddings.json"
        want = {"format": FORMAT, "version": 1, "dtype": self.dtype, "dim": self.dim, "model": self.model,
                "out": self.out, "normalized": True}
        ours = [p for p in self.dir.iterdir() if p.name in ("img_emb", "metadata", ".staging", "embeddings.json")]
        have = None
        if record.is_file():
            try:
                have = json.loads(record.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                if not self.overwrite:
                    raise InputFormatError(f"{record} is unreadable ({exc}); move the folder away, or pass "
                                           "--overwrite to start the run and its embeddings afresh") from None
        if self.overwrite and (have is None or have.get("out") == self.out):
            for p in ours:  # --overwrite restarts this OUT's embeddings, never another OUT's
                _remove(p)
            have = None
        if have is not None:
            diff = [k for k in ("format", "dtype", "dim", "model", "out") if have.get(k) != want[k]]
            if diff:
                raise InputFormatError(
                    f"--save-embeddings {self.dir} holds embeddings of other settings ({', '.join(diff)} differ: "
                    f"{', '.join(f'{k}={have.get(k)!r}' for k in diff if k != 'model')}"
                    f"{' and another model' if 'model' in diff else ''}); choose another folder"
                    f"{'' if 'out' in diff else ', or pass --overwrite to start the run and its embeddings afresh'}")
            return
        if [p for p in self.dir.iterdir() if not p.name.startswith(".")]:
            raise InputFormatError(f"--save-embeddings {self.dir} is not empty and holds no embeddings.json; choose an "
                                   "empty or new folder")
        atomic_write_json(record, {**want, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

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
                         "key": getattr(src, "key", None), "shard": getattr(src, "shard_as_given", None),
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
        return self.dir / ".staging" / f"emb_{n}.bin", self.dir / ".staging" / f"meta_{n}.jsonl"

    def _staged(self) -> list[int]:
        staging = self.dir / ".staging"
        nums = {int(m.group(1)) for p in staging.iterdir() if (m := re.match(r"^(?:emb|meta)_(\d+)\.", p.name))} \
            if staging.is_dir() else set()
        return sorted(nums)

    def _staged_rows(self) -> int:
        rows = 0
        for n in self._staged():
            p = self.dir / ".staging" / f"emb_{n}.bin"
            rows += p.stat().st_size // (self.dim * np.dtype(self.dtype).itemsize) if p.exists() else 0
        return rows

    def _rows_in_parts(self) -> int:
        return sum(int(np.load(p, mmap_mode="r").shape[0]) for p in (self.dir / "img_emb").glob("img_emb_*.npy"))

    def _drop_unpaired_metadata(self) -> None:
        """A metadata_N.parquet without its img_emb_N.npy is a part a kill interrupted (the .npy is
        written last): its rows are still staged, so it goes."""
        for p in (self.dir / "metadata").glob("metadata_*.parquet"):
            n = p.name[len("metadata_"):-len(".parquet")]
            if not (self.dir / "img_emb" / f"img_emb_{n}.npy").exists():
                p.unlink()

    def _next_part(self) -> int:
        nums = [int(m.group(1)) for p in (self.dir / "img_emb").iterdir() if (m := _PART.match(p.name))]
        return max(nums) + 1 if nums else 0

    def _finish_staging(self, keep: set[str] | None) -> None:
        """Staged rows -> img_emb_N.npy + metadata_N.parquet (only those in ``keep`` when given; a row
        staged twice, by a killed run and again, once). A part already written from them (a kill
        before the staging was cleared) is not written again."""
        for n in self._staged():
            emb_file = self.dir / ".staging" / f"emb_{n}.bin"
            meta_file = self.dir / ".staging" / f"meta_{n}.jsonl"
            if not (self.dir / "img_emb" / f"img_emb_{n}.npy").exists():
                self._part_from_staging(n, emb_file, meta_file, keep)
            crash_point("embeddings.part_written")  # tests: killed with the part written, the staging not cleared
            for f in (emb_file, meta_file):
                f.unlink(missing_ok=True)
            fsync_dir(self.dir / ".staging")

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
        import io

        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({c: pa.array([r.get(c) for r in rows], type=pa.string()) for c in META_COLUMNS})
        meta_path = self.dir / "metadata" / f"metadata_{n}.parquet"
        tmp = temp_path(meta_path)
        pq.write_table(table, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, meta_path)
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(vecs), allow_pickle=False)
        crash_point("embeddings.metadata_written")  # tests: killed between the two files of a part
        atomic_write_bytes(self.dir / "img_emb" / f"img_emb_{n}.npy", buf.getvalue())  # last: it marks the part
        fsync_dir(self.dir / "metadata")


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
