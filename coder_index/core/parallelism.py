"""How many decode worker processes and torch threads a run uses, from the cores and the model.

Decoding and preprocessing run in worker processes, encoding in the main process. Which side needs
the cores depends on the model: a small model encodes a batch in less time than the workers take to
decode it, a ViT-B or larger model is the other way round. Giving torch every core while two
workers decode (the old default) oversubscribes a small machine: on 2 cores with a small model,
one torch thread was 1.35x faster end to end. ``benchmarks/bench_threads.py`` measures the choice
against the old default.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

# Model compute per image below which decoding dominates on a CPU (about one JPEG decode + resize).
DECODE_BOUND_GFLOPS = 1.0


def cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def image_gflops(encoder: Any) -> float:
    """Approximate compute of one image through the vision tower: 2 x parameters x tokens."""
    visual = encoder.model.visual
    params = sum(p.numel() for p in visual.parameters())
    h, w = encoder.image_size
    patch = getattr(visual, "patch_size", None)
    if patch is not None:
        ph, pw = patch if isinstance(patch, (tuple, list)) else (patch, patch)
        tokens = (h // ph) * (w // pw) + 1
    else:  # convolutional towers: about a 7 x 7 grid's worth of work per parameter
        tokens = 49
    return 2.0 * params * tokens / 1e9


@dataclass(frozen=True)
class Parallelism:
    threads: int   # torch threads of the main (encoding) process
    workers: int   # decoding processes (0: decode in the main process)
    why: str


def choose(encoder: Any, *, threads: int | None = None, workers: int | None = None) -> Parallelism:
    """Explicit values win; otherwise decide from the cores, the device and the model's size."""
    cores = cpu_count()
    if getattr(encoder, "device", None) is not None and encoder.device.type == "cuda":
        auto = Parallelism(max(1, min(4, cores // 4)), max(1, min(8, cores - 1)), "GPU: the cores decode")
    else:
        gflops = image_gflops(encoder)
        if gflops < DECODE_BOUND_GFLOPS:
            auto = Parallelism(1, max(1, cores), f"small model ({gflops:.2f} GFLOP/image): the cores decode")
        else:
            # two workers keep a large model fed with full-size photos (one was 7% slower on 2 cores)
            auto = Parallelism(cores, 2 if cores <= 8 else min(8, cores // 4),
                               f"{gflops:.1f} GFLOP/image: the cores encode")
    return Parallelism(threads if threads is not None else auto.threads,
                       workers if workers is not None else auto.workers, auto.why)


@contextmanager
def torch_threads(n: int):  # noqa: ANN201 - a context manager
    """Use ``n`` torch threads for the duration, then restore the caller's setting."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def parallel_encoding(encoder: Any, *, threads: int | None = None, workers: int | None = None):  # noqa: ANN201
    """Choose (``choose``) and apply the torch threads for the duration; yields the plan, whose
    ``workers`` the caller gives its loader."""
    plan = choose(encoder, threads=threads, workers=workers)
    with torch_threads(plan.threads):
        yield plan
