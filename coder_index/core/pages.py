"""Resident memory of read-only memory maps (numpy and the standard library only: cheap to import)."""

from __future__ import annotations

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
    global _LIBC
    if _LIBC is None:
        import ctypes

        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    if _LIBC:
        try:
            _LIBC.malloc_trim(0)  # type: ignore[attr-defined]
        except AttributeError:
            pass
