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
