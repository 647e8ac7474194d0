"""Where the numeric work runs, and in what precision.

Every product and reduction of the per-image path (CODER, stage-1 reductions, top-k, rerank, adapter)
is written once in torch and runs on the index's device: the CPU (where it stays the tested path)
or a GPU, where only the top-k rows come back to the host.

METHODS.md asks float32 accumulation for the CODER product. On Ampere and later GPUs torch may run
float32 matrix products as TF32 (a 10-bit mantissa), and oneDNN on recent CPUs as bf16, when a
user's own code allowed it (``torch.backends.cuda.matmul.fp32_precision = "tf32"``, the older
``allow_tf32`` flags or ``torch.set_float32_matmul_precision("high")``). ``exact_float32()`` wraps
every product here: it sets every such switch to IEEE float32 for the duration, and the last of any
concurrent users puts the caller's settings back.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

_lock = threading.Lock()
_users = 0
_saved: list[tuple[Any, str, Any]] = []


def precision_switches() -> list[tuple[Any, str]]:
    """(object, attribute) of every switch that can lower float32 products below IEEE float32.
    torch 2.9+ has one ``fp32_precision`` per backend (and refuses to mix it with the older flags,
    which it still reads); older torch has the global precision and the two ``allow_tf32`` flags."""
    b = torch.backends
    if hasattr(b.cuda.matmul, "fp32_precision"):
        parts = [b.cuda.matmul, getattr(b.cudnn, "conv", None), getattr(b.cudnn, "rnn", None),
                 getattr(getattr(b, "mkldnn", None), "matmul", None), getattr(getattr(b, "mkldnn", None), "conv", None)]
        return [(o, "fp32_precision") for o in parts if o is not None and hasattr(o, "fp32_precision")]
    return [(b.cuda.matmul, "allow_tf32"), (b.cudnn, "allow_tf32")]


def _exact_value(attr: str) -> Any:
    return "ieee" if attr == "fp32_precision" else False


@contextmanager
def exact_float32() -> Iterator[None]:
    """Float32 products accumulate in float32 (IEEE, no TF32 or bf16) for the duration, on every device."""
    global _users
    with _lock:
        if _users == 0:
            legacy = not hasattr(torch.backends.cuda.matmul, "fp32_precision")
            if legacy:
                _saved.append((torch, "float32_matmul_precision", torch.get_float32_matmul_precision()))
                torch.set_float32_matmul_precision("highest")
            for obj, attr in precision_switches():
                _saved.append((obj, attr, getattr(obj, attr)))
                setattr(obj, attr, _exact_value(attr))
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                while _saved:
                    obj, attr, value = _saved.pop()
                    if obj is torch:
                        torch.set_float32_matmul_precision(value)
                    else:
                        setattr(obj, attr, value)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device a computation runs on: the one named, else the best one present (as the encoder)."""
    from coder_index.model.encoder import pick_device

    return device if isinstance(device, torch.device) else pick_device(device)


def on_device(a: Any, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``a`` (array or tensor) as a ``dtype`` tensor on ``device``; on the CPU a float32 array (a
    read-only or unaligned memory map included) is used in place, not copied."""
    if isinstance(a, torch.Tensor):
        return a.to(device=device, dtype=dtype)
    if dtype == torch.float32:
        from coder_index.core.linalg import as_tensor

        t = as_tensor(np.asarray(a))
    else:
        t = torch.as_tensor(np.asarray(a)).to(dtype)
    return t.to(device, non_blocking=True) if device.type != "cpu" else t


def block_budget(device: torch.device, cpu_bytes: int, gpu_bytes: int) -> int:
    """Bytes a temporary may take: small on the CPU (caches, RAM), large on a GPU (fewer, larger kernels)."""
    return cpu_bytes if device.type == "cpu" else gpu_bytes
