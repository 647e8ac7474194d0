"""One thread owns the model: requests queue their work, concurrent images are encoded together.

Torch modules, the index's caches and X-MoRe's per-run state are then touched by one thread only,
and N concurrent one-image requests cost one batched forward pass instead of N (up to
``max_batch`` images; a request is never split). Each request's own scoring runs after the pass,
in the same thread; scorers that work row by row (``rowwise``) score all their requests' rows in
one call.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class Job:
    future: Future = field(default_factory=Future)
    pixels: torch.Tensor | None = None                        # images to encode first
    finish: Callable[[np.ndarray], Any] | None = None         # this job's embeddings -> its result
    rowwise: Callable[[np.ndarray], list[Any]] | None = None  # embeddings -> one result per row
    call: Callable[[], Any] | None = None                     # work without images (a text query)

    @property
    def n(self) -> int:
        return 0 if self.pixels is None else len(self.pixels)


class ModelWorker:
    def __init__(self, encode: Callable[[torch.Tensor], np.ndarray], max_batch: int = 64) -> None:
        self.encode, self.max_batch = encode, max_batch
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="coder-index-model", daemon=True)
        self._thread.start()
        self.batches = 0        # forward passes run (for tests and /api/info)
        self.images = 0

    def submit(self, job: Job) -> Future:
        if not self._thread.is_alive():
            raise RuntimeError("the model worker has stopped")
        self._queue.put(job)
        return job.future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            jobs, n = [job], job.n
            while n < self.max_batch:  # take what is waiting now, never wait for more
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                jobs.append(nxt)
                n += nxt.n
            self._run(jobs)

    def _run(self, jobs: list[Job]) -> None:
        for job in jobs:
            if job.call is not None:
                _settle(job.future, job.call)
        imaging = [j for j in jobs if j.pixels is not None]
        if not imaging:
            return
        try:
            emb = self.encode(torch.cat([j.pixels for j in imaging]))
        except Exception as exc:
            for j in imaging:
                j.future.set_exception(exc)
            return
        self.batches += 1
        self.images += len(emb)
        starts = np.cumsum([0] + [j.n for j in imaging])
        groups: dict[int, list[int]] = {}
        for i, j in enumerate(imaging):
            if j.rowwise is not None:
                groups.setdefault(id(j.rowwise), []).append(i)
            else:
                _settle(j.future, lambda j=j, i=i: j.finish(emb[starts[i]:starts[i + 1]]))
        for members in groups.values():
            rows = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in members])
            try:
                results = imaging[members[0]].rowwise(emb[rows])
            except Exception as exc:
                for i in members:
                    imaging[i].future.set_exception(exc)
                continue
            at = 0
            for i in members:
                imaging[i].future.set_result(results[at:at + imaging[i].n])
                at += imaging[i].n


def _settle(future: Future, fn: Callable[[], Any]) -> None:
    try:
        future.set_result(fn())
    except Exception as exc:
        future.set_exception(exc)
