"""Resident memory of read-only memory maps (numpy and the standard library only: cheap to import)."""

from __future__ import annotations

import ctypes
import mmap as mmap_module

import numpy as np


def release_pages(block: np.ndarray) -> None:
    """Drop the pages of a block of a read-only memory map from this process's resident memory once it
    has been read (they stay in the page cache, and come back on the next read). A scan over the
    index's matrix (checks, class sums) then never holds all of it; anything else is left alone."""
    mm, obj = None, block
    while obj is not None and mm is None:  # views (np.asarray of a memmap too) lead to the mapping by .base
        mm = obj if isinstance(obj, mmap_module.mmap) else getattr(obj, "_mmap", None)
        obj = getattr(obj, "base", None)
    if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap_module, "MADV_DONTNEED"):
        return
    try:
        start = block.__array_interface__["data"][0] - np.frombuffer(mm, np.uint8).__array_interface__["data"][0]
        page = mmap_module.PAGESIZE
        lo = -(-start // page) * page                 # whole pages inside the block only
        hi = (start + block.nbytes) // page * page
        if hi > lo:
            mm.madvise(mmap_module.MADV_DONTNEED, lo, hi - lo)
    except (ValueError, OSError, TypeError):
        pass  # not a plain mapping of ours: keep the pages


_LIBC: object | None = None


def trim_heap() -> None:
    """Hand the heap memory this process has freed back to the system (glibc's malloc_trim: every
    arena). glibc keeps freed memory in per-thread arenas, so a large image decoded in one thread and
    freed still counts in resident memory while the next is decoded in another; trimming after each
    large decode keeps the peak at what is live. A no-op where the C library is not glibc."""
    libc = _libc()
    if libc is not None:
        try:
            libc.malloc_trim(0)
        except AttributeError:
            pass


def _mapped_regions(path: str) -> list[tuple[int, int]]:
    """(address, length) of this process's read-only mappings of the file at ``path`` (Linux: from
    /proc/self/maps; elsewhere none)."""
    regions = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="surrogateescape") as maps:
            for line in maps:
                parts = line.rstrip("\n").split(None, 5)
                if len(parts) == 6 and parts[5] == path and "w" not in parts[1]:
                    lo, hi = (int(v, 16) for v in parts[0].split("-"))
                    regions.append((lo, hi - lo))
    except OSError:
        return []
    return regions


def release_file_pages(path: str) -> None:
    """Drop this process's resident pages of every read-only mapping of the file at ``path`` (a FAISS
    index FAISS memory-maps itself, whose mapping we hold no handle to). The pages stay in the page
    cache and come back, without reading the disk, on the next access: a process that searches a
    memory-mapped index batch after batch then holds one batch's pages, not every page it ever read.
    The mappings are looked up each time, so an address is never used after its mapping is gone; only
    read-only, file-backed mappings are touched (for those MADV_DONTNEED loses nothing)."""
    if not hasattr(mmap_module, "MADV_DONTNEED"):
        return
    regions = _mapped_regions(path)
    if not regions:
        return
    libc = _libc()
    if libc is None:
        return
    for address, length in regions:
        libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), mmap_module.MADV_DONTNEED)


def _libc():  # noqa: ANN202 - a ctypes handle on the C library, or None
    """The C library (loaded once, shared with ``trim_heap``), madvise typed for 64-bit addresses."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(None, use_errno=True)
            _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]  # type: ignore[attr-defined]
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC or None
