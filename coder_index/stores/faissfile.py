"""The on-disk layout of an index's vector files, read without FAISS: checks and fingerprints.

A vector file is FAISS's serialisation of ``IndexIDMap2(IndexFlatIP(d))``:

    "IxM2" header(d, ntotal, ...) "IxFI" header(d, ntotal, ...)
    size_t(ntotal * d) float32[ntotal, d]        the vectors ("codes")
    size_t(ntotal)     int64[ntotal]             the ids (== SQLite row ids)

Parsing the two headers tells type, width and count at once, and gives the exact size the file
must have, so truncation, another index type or another width is caught without loading vectors.
A quick digest (headers, ids and a sample of vector pages) catches a file copied from another
index or with permuted ids; the full sha256 is computed on every write and checked on request.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HEADER = struct.Struct("<iqqqBi")      # d, ntotal, dummy, dummy, is_trained, metric_type
METRIC_INNER_PRODUCT = 0
SAMPLE_PAGES = 256
PAGE = 4096


class VectorFileError(Exception):
    """The file is not a well-formed IndexIDMap2(IndexFlatIP) file; the message says what is wrong."""


@dataclass(frozen=True)
class VectorFileInfo:
    dim: int
    ntotal: int
    codes_offset: int   # byte offset of float32[ntotal, dim]
    ids_offset: int     # byte offset of int64[ntotal]
    size: int           # the size the file must have


def _header(buf: bytes, at: int, what: str) -> tuple[int, int, int, int]:
    if len(buf) < at + HEADER.size:
        raise VectorFileError(f"it ends inside the {what} header (truncated)")
    d, ntotal, _, _, _, metric = HEADER.unpack_from(buf, at)
    at += HEADER.size
    if metric > 1:  # metrics above L2 carry a float argument
        at += 4
    return d, ntotal, metric, at


def read_info(path: Path) -> VectorFileInfo:
    """Type, width, count and expected size from the headers; VectorFileError if anything is off."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            buf = f.read(256)
    except FileNotFoundError:
        raise VectorFileError("the file is missing") from None
    if size == 0:
        raise VectorFileError("the file is empty")
    if buf[:4] != b"IxM2":
        raise VectorFileError(f"it is not an IndexIDMap2 file (starts with {buf[:4]!r})")
    d, ntotal, _, at = _header(buf, 4, "IndexIDMap2")
    if buf[at:at + 4] != b"IxFI":
        raise VectorFileError(f"its inner index is {buf[at:at + 4]!r}, not IndexFlatIP ('IxFI')")
    d2, n2, metric, at = _header(buf, at + 4, "IndexFlatIP")
    if metric != METRIC_INNER_PRODUCT or d2 != d or n2 != ntotal or d <= 0 or ntotal < 0:
        raise VectorFileError(f"inconsistent headers (d={d}/{d2}, ntotal={ntotal}/{n2}, metric={metric})")
    if len(buf) < at + 8:
        raise VectorFileError("it ends before its vectors (truncated)")
    (n_codes,) = struct.unpack_from("<Q", buf, at)
    if n_codes != ntotal * d:
        raise VectorFileError(f"it declares {n_codes} vector values, not ntotal x d = {ntotal * d}")
    codes = at + 8
    ids = codes + 4 * ntotal * d + 8
    expected = ids + 8 * ntotal
    if size != expected:
        raise VectorFileError(f"it has {size} bytes; {ntotal} vectors of width {d} take {expected} (truncated or "
                              "extended)")
    with open(path, "rb") as f:
        f.seek(ids - 8)
        (n_ids,) = struct.unpack("<Q", f.read(8))
    if n_ids != ntotal:
        raise VectorFileError(f"it declares {n_ids} ids for {ntotal} vectors")
    return VectorFileInfo(d, ntotal, codes, ids, size)


def digest(path: Path, info: VectorFileInfo | None = None, *, full: bool = False) -> str:
    """sha256 of the whole file (``full``), or quick: headers, all ids and up to 256 vector pages."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if full:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
            return h.hexdigest()
        info = info or read_info(path)
        h.update(f.read(info.codes_offset))
        f.seek(info.ids_offset)
        h.update(f.read(8 * info.ntotal))
        span = info.ids_offset - 8 - info.codes_offset
        pages = max(1, span // PAGE)
        step = max(1, pages // SAMPLE_PAGES)
        for p in range(0, pages, step):
            f.seek(info.codes_offset + p * PAGE)
            h.update(f.read(min(PAGE, span - p * PAGE)))
    return "quick:" + h.hexdigest()


def fingerprint(path: Path) -> dict[str, object]:
    """What the state table records for a committed vector file."""
    info = read_info(path)
    return {"size": info.size, "ntotal": info.ntotal, "dim": info.dim, "quick": digest(path, info),
            "sha256": digest(path, info, full=True)}


# ---------------------------------------------------------------------------------- reading and writing
def open_matrix(path: Path, info: VectorFileInfo | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids [K] int64, vectors [K, D] float32), memory-mapped read-only from the file: the one copy of
    the matrix is the page cache's, shared by every reader and every process."""
    info = info or read_info(path)
    if info.ntotal == 0:
        return np.zeros(0, np.int64), np.zeros((0, info.dim), np.float32)
    vectors = np.memmap(path, dtype=np.float32, mode="r", offset=info.codes_offset, shape=(info.ntotal, info.dim))
    ids = np.memmap(path, dtype=np.int64, mode="r", offset=info.ids_offset, shape=(info.ntotal,))
    return ids, vectors


def _file_header(dim: int, ntotal: int) -> bytes:
    one = HEADER.pack(dim, ntotal, 1 << 20, 1 << 20, 1, METRIC_INNER_PRODUCT)
    return b"IxM2" + one + b"IxFI" + one


def write_matrix(path: Path, sources: list[tuple[np.ndarray, np.ndarray]], dim: int,
                 order: np.ndarray | None = None, chunk_rows: int = 16384) -> None:
    """Write an IndexIDMap2(IndexFlatIP) file (the byte layout FAISS writes and reads) streaming:
    ``sources`` are (ids, vectors) parts, memory-mapped or not, concatenated; ``order`` (positions in
    that concatenation) sets the row order of the file. Nothing is copied whole."""
    from coder_index.core.faults import armed

    sizes = [len(i) for i, _ in sources]
    ntotal = sum(sizes)
    if any(len(i) != len(v) for i, v in sources):
        raise ValueError("as many ids as vectors are needed")
    if any(len(v) and v.shape[1] != dim for _, v in sources):
        raise ValueError(f"vectors of another width than {dim}")
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    order = np.arange(ntotal, dtype=np.int64) if order is None else np.asarray(order, dtype=np.int64)

    def gather(pos: np.ndarray, which: int) -> np.ndarray:
        part = np.searchsorted(starts, pos, side="right") - 1
        out = np.empty((len(pos), dim) if which else len(pos), np.float32 if which else np.int64)
        for k in np.unique(part):
            sel = part == k
            local = pos[sel] - starts[k]
            src = sources[k][which]
            # sorted reads are kinder to a memory-mapped file; the result keeps ``pos``'s order
            srt = np.argsort(local, kind="stable")
            block = np.asarray(src[local[srt]])
            out_sel = np.flatnonzero(sel)
            out[out_sel[srt]] = block
        return out

    with open(path, "wb") as f:
        f.write(_file_header(dim, ntotal))
        f.write(struct.pack("<Q", ntotal * dim))
        for s in range(0, ntotal, chunk_rows):
            f.write(gather(order[s:s + chunk_rows], 1).astype("<f4", copy=False).tobytes())
            if armed("faiss.torn_write") and s + chunk_rows >= ntotal // 2:  # the machine dies mid-file
                f.flush()
                os.kill(os.getpid(), 9)
        f.write(struct.pack("<Q", ntotal))
        for s in range(0, ntotal, chunk_rows * 8):
            f.write(gather(order[s:s + chunk_rows * 8], 0).astype("<i8", copy=False).tobytes())
        f.flush()
        os.fsync(f.fileno())
