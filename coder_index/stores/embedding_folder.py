"""A clip-retrieval / LAION embedding folder, read where it lives and never written to.

    ROOT/img_emb/img_emb_N.npy          [rows, D] image embeddings (fp16 as LAION ships them, or fp32)
    ROOT/metadata/metadata_N.parquet    row-aligned metadata: ``caption``, and ``url``/``key`` if present
    ROOT/text_emb/text_emb_N.npy        optional: embeddings of the raw captions

ROOT is a local folder or an object-store URL (``s3://``, ``gs://``: anything fsspec lists). Row ``r``
of the folder is row ``r - start`` of the shard whose rows cover it, shards in the order of N (the
order clip-retrieval and autofaiss number them). Only what is asked for is read: the ``.npy`` headers
at scan time, then single rows of the embeddings (memory-mapped when local, byte ranges when remote)
and single row groups of the metadata's caption column. Memory does not grow with the folder's rows.

``fingerprint`` is what a corpus that refers to the folder records and checks on open: the size of
every file, the row count of every shard and a hash of the head and tail of a few files.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import IO, Any

import numpy as np

from coder_index.core.errors import IndexFormatError, InputFormatError
from coder_index.core.pages import release_pages
from coder_index.core.redaction import public_url
from coder_index.core.remote import RemoteError, is_remote, open_random_access

_NUMBERED = re.compile(r"_(\d+)\.(npy|parquet)$")
_HASH_BYTES = 1 << 16          # head and tail bytes of a file that go into the sample hash
_HASHED_SHARDS = 8             # files hashed: the first, the last and a spread between
_ROW_GROUPS_KEPT = 8           # decoded caption row groups kept between lookups (bounded memory)


@dataclass(frozen=True)
class Shard:
    number: int
    emb: str          # path relative to the root
    meta: str
    text: str | None
    rows: int
    dim: int
    dtype: str        # numpy dtype string of the embeddings ("<f2", "<f4")
    data_offset: int  # where the rows start in the .npy file (after its header)
    emb_size: int
    meta_size: int
    text_size: int | None = None


class EmbeddingFolder:
    """The shards of ROOT (see the module docstring); ``shards`` from a manifest skips the scan."""

    def __init__(self, root: str, shards: list[Shard] | None = None) -> None:
        self.root = root.rstrip("/") if is_remote(root) else root
        self.remote = is_remote(root)
        self._fs: Any = None
        self._mmaps: dict[str, np.ndarray] = {}
        self._parquet: dict[str, Any] = {}
        self._groups: dict[str, np.ndarray] = {}  # meta -> row group starts
        self._decoded: OrderedDict[tuple[str, int, str], list[Any]] = OrderedDict()
        self.shards = shards if shards is not None else self._scan()
        self.starts = np.cumsum([0] + [s.rows for s in self.shards]).astype(np.int64)

    # ------------------------------------------------------------------ files
    @property
    def public_root(self) -> str:
        return public_url(self.root) if self.remote else self.root

    def _join(self, rel: str) -> str:
        return f"{self.root}/{rel}" if self.remote else str(_local_join(self.root, rel))

    def _filesystem(self) -> tuple[Any, str]:
        if self._fs is None:
            from coder_index.core.remote import filesystem

            self._fs = filesystem(self.root)
        return self._fs

    def _listing(self, folder: str) -> dict[str, int]:
        """name -> size of the files in ROOT/folder (one listing; nothing is opened)."""
        if not self.remote:
            from pathlib import Path

            d = Path(self.root) / folder
            if not d.is_dir():
                return {}
            return {p.name: p.stat().st_size for p in d.iterdir() if p.is_file()}
        fs, path = self._filesystem()
        where = f"{path.rstrip('/')}/{folder}"
        try:
            fs.invalidate_cache(where)  # what is there now, not what an earlier listing saw
            entries = fs.ls(where, detail=True)
        except FileNotFoundError:
            return {}
        except Exception as exc:  # noqa: BLE001 - named to the user below, with the URL redacted
            raise RemoteError(f"cannot list {self.public_root}/{folder}: {type(exc).__name__}") from None
        return {e["name"].rsplit("/", 1)[-1]: int(e.get("size") or 0) for e in entries if e.get("type") != "directory"}

    def open(self, rel: str, size: int | None = None) -> IO[bytes]:
        return open_random_access(self._join(rel), size=size)

    def _scan(self) -> list[Shard]:
        embs, metas, texts = self._listing("img_emb"), self._listing("metadata"), self._listing("text_emb")
        if not embs or not metas:
            raise InputFormatError(f"{self.public_root} must hold img_emb/img_emb_*.npy and "
                                   "metadata/metadata_*.parquet (the layout clip-retrieval and LAION publish)")
        by_number = {int(m.group(1)): n for n in embs if n.startswith("img_emb") and (m := _NUMBERED.search(n))}
        meta_by = {int(m.group(1)): n for n in metas if n.startswith("metadata") and (m := _NUMBERED.search(n))}
        text_by = {int(m.group(1)): n for n in texts if n.startswith("text_emb") and (m := _NUMBERED.search(n))}
        if not by_number:
            raise InputFormatError(f"{self.public_root}/img_emb has no img_emb_*.npy shards")
        unpaired = sorted(set(by_number) ^ set(meta_by))
        if unpaired:
            raise InputFormatError(f"{self.public_root}: shards without their pair (img_emb or metadata missing): "
                                   f"{unpaired[:5]}")
        shards = []
        for n in sorted(by_number):
            emb = f"img_emb/{by_number[n]}"
            shape, dtype, offset = self._npy_header(emb, embs[by_number[n]])
            meta = f"metadata/{meta_by[n]}"
            rows = self._parquet_rows(meta, metas[meta_by[n]])
            if len(shape) != 2:
                raise InputFormatError(f"{emb}: embeddings of shape {shape}, expected [rows, D]")
            if rows != shape[0]:
                raise InputFormatError(f"{meta} has {rows} rows but {emb} {shape[0]}: the shards are not row-aligned")
            text = f"text_emb/{text_by[n]}" if n in text_by else None
            shards.append(Shard(n, emb, meta, text, int(shape[0]), int(shape[1]), dtype, offset, embs[by_number[n]],
                                metas[meta_by[n]], texts[text_by[n]] if n in text_by else None))
        dims = {s.dim for s in shards}
        if len(dims) != 1:
            raise InputFormatError(f"{self.public_root}: shards of different widths {sorted(dims)}")
        return shards

    def _npy_header(self, rel: str, size: int) -> tuple[tuple[int, ...], str, int]:
        with self.open(rel, size) as f:
            head = io.BytesIO(f.read(min(size, 4096)))
        try:
            version = np.lib.format.read_magic(head)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(head)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(head)
        except ValueError as exc:
            raise InputFormatError(f"{self.public_root}/{rel} is not a .npy file ({exc})") from None
        if fortran or dtype.kind != "f" or dtype.itemsize not in (2, 4) or dtype.hasobject:
            raise InputFormatError(f"{self.public_root}/{rel}: {dtype} {'Fortran-order ' if fortran else ''}array; "
                                   "expected C-order float16 or float32 embeddings")
        offset = head.tell()
        expected = offset + int(np.prod(shape)) * dtype.itemsize
        if size < expected:
            raise InputFormatError(f"{self.public_root}/{rel} is cut short: {size} bytes, its header says {expected}")
        return tuple(int(x) for x in shape), dtype.str, offset

    def _parquet_file(self, rel: str, size: int | None = None) -> Any:
        pf = self._parquet.get(rel)
        if pf is None:
            import pyarrow.parquet as pq

            source: Any = self._join(rel) if not self.remote else self.open(rel, size)
            # read, not memory-mapped: a mapping would keep every row group ever looked up resident
            # (the page cache keeps them either way)
            pf = pq.ParquetFile(source, memory_map=False)
            self._parquet[rel] = pf
        return pf

    def _parquet_rows(self, rel: str, size: int) -> int:
        pf = self._parquet_file(rel, size)
        if "caption" not in pf.schema_arrow.names:
            raise InputFormatError(f"{self.public_root}/{rel} has no 'caption' column "
                                   f"(columns: {pf.schema_arrow.names})")
        return int(pf.metadata.num_rows)

    # ------------------------------------------------------------------ rows
    @property
    def rows(self) -> int:
        return int(self.starts[-1])

    @property
    def dim(self) -> int:
        return self.shards[0].dim

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, row within the shard) of folder rows ``ids`` (all valid)."""
        ids = np.asarray(ids, np.int64)
        which = np.searchsorted(self.starts, ids, side="right") - 1
        return which, ids - self.starts[which]

    def _array(self, rel: str, shard: Shard, size: int | None) -> np.ndarray:
        arr = self._mmaps.get(rel)
        if arr is None:
            arr = np.memmap(self._join(rel), dtype=np.dtype(shard.dtype), mode="r", offset=shard.data_offset,
                            shape=(shard.rows, shard.dim))
            self._mmaps[rel] = arr
        return arr

    def vectors(self, ids: np.ndarray, kind: str = "emb") -> np.ndarray:
        """[n, D] float32 rows ``ids`` of the image (``emb``) or caption (``text``) embeddings."""
        ids = np.asarray(ids, np.int64)
        out = np.empty((len(ids), self.dim), np.float32)
        which, local = self.locate(ids)
        for s in np.unique(which):
            shard = self.shards[int(s)]
            rel = shard.emb if kind == "emb" else shard.text
            if rel is None:
                raise InputFormatError(f"{self.public_root}: shard {shard.number} has no text_emb file")
            pick = np.flatnonzero(which == s)
            if not self.remote:
                arr = self._array(rel, shard, None)
                out[pick] = arr[local[pick]]
                release_pages(arr)  # the rows are copied: their pages need not stay this process's memory
                continue
            itemsize = np.dtype(shard.dtype).itemsize
            width = shard.dim * itemsize
            with self.open(rel, shard.emb_size if kind == "emb" else shard.text_size) as f:
                for i in pick:
                    f.seek(shard.data_offset + int(local[i]) * width)
                    out[i] = np.frombuffer(f.read(width), dtype=np.dtype(shard.dtype))
        return out

    def column(self, ids: np.ndarray, name: str = "caption") -> list[Any]:
        """The metadata column ``name`` of rows ``ids`` (None where the shard lacks it), reading only the
        row groups that hold them."""
        ids = np.asarray(ids, np.int64)
        out: list[Any] = [None] * len(ids)
        which, local = self.locate(ids)
        for s in np.unique(which):
            shard = self.shards[int(s)]
            pf = self._parquet_file(shard.meta, shard.meta_size)
            if name not in pf.schema_arrow.names:
                continue
            starts = self._groups.get(shard.meta)
            if starts is None:
                sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
                starts = self._groups[shard.meta] = np.cumsum([0] + sizes).astype(np.int64)
            pick = np.flatnonzero(which == s)
            groups = np.searchsorted(starts, local[pick], side="right") - 1
            for g in np.unique(groups):
                values = self._row_group(pf, shard.meta, int(g), name)
                for i in pick[groups == g]:
                    out[i] = values[int(local[i] - starts[g])]
        return out

    def _row_group(self, pf: Any, meta: str, group: int, name: str) -> list[Any]:
        key = (meta, group, name)
        values = self._decoded.get(key)
        if values is None:
            values = pf.read_row_group(group, columns=[name]).column(0).to_pylist()
            self._decoded[key] = values
            while len(self._decoded) > _ROW_GROUPS_KEPT:
                self._decoded.popitem(last=False)
        else:
            self._decoded.move_to_end(key)
        return values

    def close(self) -> None:
        self._mmaps.clear()
        self._parquet.clear()
        self._decoded.clear()

    # ------------------------------------------------------------------ identity
    def fingerprint(self) -> dict[str, Any]:
        """What a corpus that refers to this folder records: every shard (sizes, rows, dtype) and a hash
        of the head and tail of a spread of its files."""
        return {"root": self.public_root, "rows": self.rows, "dim": self.dim,
                "shards": [asdict(s) for s in self.shards], "sample_sha256": self._sample_hash()}

    def _hashed(self) -> list[Shard]:
        n = len(self.shards)
        picks = sorted({0, n - 1, *np.linspace(0, n - 1, min(n, _HASHED_SHARDS)).astype(int).tolist()})
        return [self.shards[i] for i in picks]

    def _sample_hash(self) -> str:
        h = hashlib.sha256()
        for shard in self._hashed():
            for rel, size in ((shard.emb, shard.emb_size), (shard.meta, shard.meta_size)):
                h.update(rel.encode())
                h.update(head_and_tail(self.open(rel, size), size))
        return h.hexdigest()

    def check(self, recorded: dict[str, Any], fix: str) -> None:
        """Refuse a folder that is no longer what ``recorded`` (its ``fingerprint``) says: a file gone,
        resized, rewritten in its sampled bytes, or a shard added."""
        where = self.public_root
        listed = {**{f"img_emb/{k}": v for k, v in self._listing("img_emb").items()},
                  **{f"metadata/{k}": v for k, v in self._listing("metadata").items()},
                  **{f"text_emb/{k}": v for k, v in self._listing("text_emb").items()}}
        for s in self.shards:
            for rel, size in ((s.emb, s.emb_size), (s.meta, s.meta_size), (s.text, s.text_size)):
                if rel is None:
                    continue
                if rel not in listed:
                    raise IndexFormatError(f"{where}/{rel}, which this corpus refers to, is gone; {fix}")
                if listed[rel] != size:
                    raise IndexFormatError(f"{where}/{rel} changed since the corpus was built ({size} bytes then, "
                                           f"{listed[rel]} now); {fix}")
        numbered = {int(m.group(1)) for k in listed if k.startswith("img_emb/img_emb") and (m := _NUMBERED.search(k))}
        if numbered != {s.number for s in self.shards}:
            raise IndexFormatError(f"{where}: the img_emb shards changed since the corpus was built "
                                   f"({len(self.shards)} then, {len(numbered)} now); {fix}")
        if self._sample_hash() != recorded.get("sample_sha256"):
            raise IndexFormatError(f"{where}: the embedding files were rewritten since the corpus was built (their "
                                   f"sampled bytes differ); {fix}")


def head_and_tail(f: IO[bytes], size: int) -> bytes:
    """The first and last ``_HASH_BYTES`` of an open file (closed here)."""
    with f:
        head = f.read(min(size, _HASH_BYTES))
        if size > _HASH_BYTES:
            f.seek(max(_HASH_BYTES, size - _HASH_BYTES))
            head += f.read()
    return head


def _local_join(root: str, rel: str) -> Any:
    from pathlib import Path

    return Path(root) / rel


def shards_from(recorded: dict[str, Any]) -> list[Shard]:
    return [Shard(**s) for s in recorded["shards"]]
