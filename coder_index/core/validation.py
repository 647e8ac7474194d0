"""Input checks shared by the numeric core: validate once, at the public boundary (METHODS.md §7)."""

from __future__ import annotations

from typing import Any

import numpy as np

from coder_index.core.pages import release_pages

TEXT_KINDS = ("name", "attribute", "analogous", "synonym")


def to_numpy(x: Any) -> np.ndarray:
    """Accept numpy arrays, torch tensors and nested sequences without importing torch eagerly."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor
        x = x.detach().cpu()
        if str(x.dtype) in ("torch.float16", "torch.bfloat16"):
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


_CHECK_ROWS = 65536  # large inputs are checked in blocks: no temporary the size of the input


def as_float_matrix(x: Any, name: str, *, ndim: int = 2) -> np.ndarray:
    """A non-empty, finite float32 array of ``ndim`` dimensions, or a ValueError naming ``name``.
    A float32 C-contiguous input (a memory-mapped matrix included) is returned as is, not copied."""
    arr = to_numpy(x)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-D array, got shape {arr.shape}")
    if arr.size == 0 or 0 in arr.shape:
        raise ValueError(f"{name} is empty (shape {arr.shape}); pass at least one row and one column")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    for s in range(0, arr.shape[0], _CHECK_ROWS):
        block = arr[s:s + _CHECK_ROWS]
        finite = bool(np.isfinite(block).all())
        release_pages(block)
        if not finite:
            bad = s + int(np.argwhere(~np.isfinite(block))[0][0])
            raise ValueError(f"{name} contains NaN or inf values (first in row {bad}); clean the input first")
    return arr


def row_norms(x: np.ndarray) -> np.ndarray:
    """L2 norms of the rows, computed in blocks; einsum makes no squared copy of a block (np.linalg.norm
    does), so checking the index's mapped matrix allocates only the norms."""
    out = []
    for s in range(0, len(x), _CHECK_ROWS):
        b = x[s:s + _CHECK_ROWS]
        out.append(np.sqrt(np.einsum("ij,ij->i", b, b, dtype=np.float32)))
        release_pages(b)
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def l2_normalize(x: np.ndarray, name: str, *, copy_if_normalized: bool = True) -> np.ndarray:
    """Row-wise L2 normalisation; a zero row has no direction, so it is an error, not a silent NaN.
    With ``copy_if_normalized=False`` rows that already have unit norm (to float32 rounding) are
    returned as they are: an index's stored matrix is normalised, and must not be copied."""
    norms = row_norms(x)[:, None]
    if (norms == 0).any():
        raise ValueError(f"{name} row {int(np.argwhere(norms[:, 0] == 0)[0][0])} is all zeros; "
                         "embeddings must be non-zero vectors")
    if not copy_if_normalized and np.abs(norms - 1).max() < 1e-5:
        return x
    return (x / norms).astype(np.float32, copy=False)


def as_class_ids(x: Any, name: str, length: int, n_classes: int) -> np.ndarray:
    arr = to_numpy(x)
    if arr.ndim != 1 or arr.shape[0] != length:
        raise ValueError(f"{name} must be a 1-D array of length {length}, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.issubdtype(arr.dtype, np.floating) or not np.all(np.mod(arr, 1) == 0):
            raise ValueError(f"{name} must hold integer class ids, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= n_classes):
        raise ValueError(f"{name} holds class ids outside [0, {n_classes}): "
                         f"min {arr.min()}, max {arr.max()}")
    return arr


def as_kinds(x: Any, name: str, length: int) -> np.ndarray:
    arr = np.asarray(list(x) if not isinstance(x, np.ndarray) else x, dtype=object)
    if arr.ndim != 1 or arr.shape[0] != length:
        raise ValueError(f"{name} must be a 1-D sequence of length {length}, got shape {arr.shape}")
    unknown = sorted({str(k) for k in arr} - set(TEXT_KINDS))
    if unknown:
        raise ValueError(f"{name} has unknown text kind(s) {unknown}; allowed kinds are {list(TEXT_KINDS)}")
    return arr.astype(str)


def as_positive_int(x: Any, name: str) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x <= 0:
        raise ValueError(f"{name} must be a positive integer, got {x!r}")
    return int(x)
