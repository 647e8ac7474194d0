"""FAISS searches on a GPU when the device is one and FAISS has GPU support (faiss-gpu-cu12 installed
*in place of* faiss-cpu, on Linux x86-64 with CUDA); otherwise the same searches on the CPU, said once
per process, not per call. Two FAISS builds installed side by side (faiss-cpu and a faiss-gpu
package: both unpack into ``faiss/``, file over file) are named, with the fix, at the first FAISS
search of a process, on any device.

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


FAISS_DISTRIBUTIONS = ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu11", "faiss-gpu-cu12")
GPU_INSTALL = "pip uninstall -y faiss-cpu && pip install faiss-gpu-cu12"


def installed_faiss_builds() -> list[tuple[str, str]]:
    """(distribution, version) of every FAISS build installed in this environment."""
    import importlib.metadata as md

    found = []
    for name in FAISS_DISTRIBUTIONS:
        try:
            found.append((name, md.version(name)))
        except md.PackageNotFoundError:
            pass
    return found


def mixed_install() -> str | None:
    """None with one FAISS build installed; else the message naming the builds and the fix."""
    builds = installed_faiss_builds()
    if len(builds) < 2:
        return None
    names = " and ".join(f"{n} {v}" for n, v in builds)
    keep = next((n for n, _ in builds if n != "faiss-cpu"), builds[-1][0])
    return (f"two FAISS builds are installed ({names}): they unpack into the same faiss/ folder and overwrite "
            f"each other's files, so which one runs is an accident. Keep one: `pip uninstall -y "
            f"{' '.join(n for n, _ in builds)} && pip install {keep}` (GPU) or `... && pip install faiss-cpu` (CPU)")


def check_install_once() -> None:
    """Name a mixed FAISS install once per process (four metadata look-ups: 0.7 ms here, paid once)."""
    if "mixed" in _said:
        return
    mixed = mixed_install()
    if mixed is None:
        with _lock:
            _said.add("mixed")
        return
    say_once("mixed", mixed)


def gpu_support() -> str | None:
    """None if FAISS can search on a GPU here, else why not (for the one message)."""
    check_install_once()
    if not hasattr(faiss, "StandardGpuResources"):
        return f"this FAISS build has no GPU support (faiss-cpu); for FAISS on the GPU replace it: `{GPU_INSTALL}`"
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
    check_install_once()
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
    check_install_once()
    if _wants_gpu(device):
        try:
            return faiss.knn_gpu(_gpu_resources(), queries, vectors, k, metric=faiss.METRIC_INNER_PRODUCT,
                                 device=device.index or 0)
        except Exception as exc:
            say_once("knn", f"searching with FAISS on the CPU: the GPU kNN failed ({exc})")
    return faiss.knn(queries, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)
