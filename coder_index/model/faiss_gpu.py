"""FAISS searches on a GPU when the device is one and FAISS has GPU support (``pip install
coder-index[gpu]`` on Linux x86-64 with CUDA); otherwise the same searches on the CPU, said once per
process, not per call.

Used by the corpus search (X-MoRe) and the nearest-text search (explain). The few-shot support search
and the candidate search do not need it: their keys are flat, exact sets, searched as one GEMM and a
top-k in torch on the index's device (``fewshot.model``, ``candidates``).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import faiss
import numpy as np
import torch

log = logging.getLogger(__name__)

_lock = threading.Lock()
_resources: Any = None
_said: set[str] = set()


def gpu_support() -> str | None:
    """None if FAISS can search on a GPU here, else why not (for the one message)."""
    if not hasattr(faiss, "StandardGpuResources"):
        return ("this FAISS build has no GPU support (faiss-cpu); `pip install coder-index[gpu]` installs "
                "faiss-gpu on Linux x86-64 with CUDA")
    try:
        if faiss.get_num_gpus() < 1:
            return "FAISS sees no GPU"
    except Exception as exc:  # a broken CUDA runtime: search on the CPU rather than fail
        return f"FAISS could not query the GPUs ({exc})"
    return None


def say_once(key: str, message: str) -> None:
    with _lock:
        if key in _said:
            return
        _said.add(key)
    log.warning(message)


def _gpu_resources() -> Any:
    global _resources
    with _lock:
        if _resources is None:
            _resources = faiss.StandardGpuResources()
        return _resources


def _wants_gpu(device: torch.device | None) -> bool:
    if device is None or device.type != "cuda":
        return False
    why = gpu_support()
    if why is not None:
        say_once("gpu", f"searching with FAISS on the CPU: {why}")
        return False
    return True


def index_for_device(index: Any, device: torch.device | None) -> Any:
    """``index`` on ``device``'s GPU where it can be; the CPU index as it is otherwise."""
    if not _wants_gpu(device):
        return index
    try:
        return faiss.index_cpu_to_gpu(_gpu_resources(), device.index or 0, index)
    except Exception as exc:  # an index type without a GPU implementation, or GPU memory exhausted
        say_once(f"copy:{type(index).__name__}", f"searching with FAISS on the CPU: this {type(index).__name__} "
                 f"could not move to the GPU ({exc})")
        return index


def knn(queries: np.ndarray, vectors: np.ndarray, k: int, device: torch.device | None) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product kNN of ``queries`` over ``vectors`` (a memory map is read in place on the
    CPU): (similarities [N, k], positions [N, k])."""
    if _wants_gpu(device):
        try:
            return faiss.knn_gpu(_gpu_resources(), queries, vectors, k, metric=faiss.METRIC_INNER_PRODUCT,
                                 device=device.index or 0)
        except Exception as exc:
            say_once("knn", f"searching with FAISS on the CPU: the GPU kNN failed ({exc})")
    return faiss.knn(queries, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)
