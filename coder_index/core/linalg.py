"""Products with the index's text matrix that never copy it.

The text matrix is a read-only memory map of ``texts.faiss``, whose FAISS header puts the first
float at an offset that is not a multiple of 4. NumPy treats such an array as unaligned and copies
all of it into a buffer before every BLAS call (2 GB and ~8 s per product at 1M x 512); torch hands
the same memory to its GEMM as it is (x86 loads need no alignment). So every product with a matrix
that may be the mapped one goes through ``matmul_t``.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch


def as_tensor(a: np.ndarray) -> torch.Tensor:
    """A float32 tensor over ``a`` without a copy (a read-only or unaligned memory map included;
    torch only reads it). Other dtypes are converted first."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable array": nothing writes through it
        return torch.from_numpy(np.asarray(a, dtype=np.float32))


def matmul_t(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b.T`` as float32, with neither operand copied."""
    return (as_tensor(a) @ as_tensor(b).T).numpy()

