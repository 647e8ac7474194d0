"""Starting or joining Ray, and the helpers every Ray engine shares."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from coder_index.core.errors import CoderIndexError
from coder_index.core.faults import TEST_RUN, hook_variables

RAY_EXTRA = "pip install 'coder-index[ray]'"


def require_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401 - the engines run on Ray Data
    except ImportError:
        raise CoderIndexError(f"--engine ray needs Ray Data, which is not installed: {RAY_EXTRA}") from None
    return ray


def worker_env() -> dict[str, str]:
    """Variables workers need from the driver's environment: coder-index's and the offline hub's
    cache settings; the fault hooks only in a test run (``core.faults``)."""
    keep = ("CODER_INDEX_", "HF_HUB_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "OPEN_CLIP_", "TORCH_HOME", "NLTK_DATA")
    hooks = ("CODER_INDEX_CRASH_AT", "CODER_INDEX_PAUSE_AT", "CODER_INDEX_CRASH_ONCE", TEST_RUN)
    return {**{k: v for k, v in os.environ.items() if k.startswith(keep) and k not in hooks}, **hook_variables()}


@contextmanager
def ray_session(address: str | None) -> Iterator[Any]:
    """Ray, initialised for the duration: an instance already initialised in this process is used
    as it is (and left running); otherwise ``address`` None starts a local instance, "auto" joins
    the running cluster, and the session is shut down afterwards."""
    ray = require_ray()
    started = False
    if not ray.is_initialized():
        try:
            ray.init(address=address, runtime_env={"env_vars": worker_env()}, include_dashboard=False,
                     logging_level=logging.WARNING, log_to_driver=False)
        except ConnectionError as exc:
            raise CoderIndexError(f"cannot reach the Ray cluster at {address!r}: {exc}; start it with `ray start "
                                  "--head`, or leave out --ray-address for a local instance") from None
        started = True
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # coder-index shows its own bar
    ctx.verbose_progress = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def pool_size(ray: Any, actors: int | None, gpus_per_actor: float, cpus_per_actor: float) -> int:
    """``actors`` if given, else as many actors as the cluster's GPUs (or CPUs) hold."""
    if actors:
        return actors
    res = ray.cluster_resources()
    if gpus_per_actor:
        return max(1, int(res.get("GPU", 0) // gpus_per_actor))
    return max(1, int(res.get("CPU", 1) // cpus_per_actor))


def rechunk(chunks: Iterator[list[str]], size: int) -> Iterator[list[str]]:
    """Regroup a stream of lists into lists of about ``size`` items (the last may be shorter)."""
    buf: list[str] = []
    for c in chunks:
        buf.extend(c)
        while len(buf) >= size:
            yield buf[:size]
            buf = buf[size:]
    if buf:
        yield buf
