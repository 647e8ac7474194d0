"""The local engine: read, decode and encode here (the one feed, ``encode_images``), score, and hand
everything to the run's sink. It takes chunks of units from any source and never asks which kind.

A scorer that needs every embedding first (X-MoRe's normalisers over the evaluated set, ``two_pass``)
gets them from a scratch file, then scores in chunks.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from coder_index.core.parallelism import parallel_encoding
from coder_index.pipeline.encode_images import encoded_batches
from coder_index.pipeline.run_sink import RunSink
from coder_index.pipeline.sources.base import Sample, UnitDone

if TYPE_CHECKING:
    from coder_index.methods.text_index import TextIndex


class StageClock:
    """Seconds spent per stage of a run: ``feed`` (read, decode, preprocess, pixels to the device),
    ``encode``, ``score`` (CODER and the rest of the method, top-k back to the host) and ``write``
    (rows formatted, written, fsynced). The device is synchronised at each boundary so that
    asynchronous GPU work is charged to the stage that queued it: only for measuring (benchmarks),
    since the synchronisation itself removes overlap."""

    measured = True  # the feed makes its batches in line, so that each stage's time is its own

    def __init__(self, device: Any = None) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self._sync()
        t = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t

    def _sync(self) -> None:
        if self.device is not None and getattr(self.device, "type", "cpu") == "cuda":
            import torch

            torch.cuda.synchronize(self.device)


class NoClock:
    measured = False

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        yield


class WriterThread:
    """Rows formatted and written (appended, fsynced) by one thread while the next batch decodes,
    encodes and scores: writing is off the critical path. Batches are written in order; at most
    ``depth`` wait. A failed write (a full disk) stops the run at the next batch, with its own error."""

    def __init__(self, write: Callable, depth: int = 4) -> None:
        import queue
        import threading

        self.write, self.error = write, None
        self.queue: Any = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._run, name="coder-index-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.write(*item)
                except BaseException as exc:  # handed to the main thread at its next put or at close
                    self.error = exc

    def put(self, *args: Any) -> None:
        self._raise()
        self.queue.put(args)

    def close(self) -> None:
        """Write what is queued (rows already computed are kept, even when the run stops), then raise
        a write's error, if any."""
        self.queue.put(None)
        self.thread.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error


def spread(units: list[Any], workers: int) -> list[Any]:
    """Fewer units of many images than can keep the workers busy: each split into one part per worker
    where the unit can be read in parts cheaply (``Unit.split``), so that one large shard uses them all."""
    if workers <= 1 or not units or units[0].single or len(units) >= 4 * workers:
        return units
    return [part for unit in units for part in unit.split(workers)]


class LocalEngine:
    """Decode and encode in this process (with its decoding workers), score, write through the sink."""

    def __init__(self, index: TextIndex, scorer: Any, *, batch_size: int = 64, workers: int | None = None,
                 threads: int | None = None, decode: str = "cpu", clock: Any = None, progress: bool = True) -> None:
        self.index, self.scorer, self.batch_size = index, scorer, batch_size
        self.workers, self.threads, self.decode = workers, threads, decode
        self.clock = clock or NoClock()
        self.progress = progress

    def run(self, work: Iterator[list[Any]], sink: RunSink) -> None:
        if self.scorer.two_pass:
            self._two_passes(work, sink)
        else:
            self._streaming(work, sink)

    def _batches(self, units: list[Any], plan: Any, sink: RunSink, first_batch: dict[str, bool] | None = None
                 ) -> Iterator[Any]:
        """The encoded batches of ``units``; their errors and read failures written as they come."""
        for batch in encoded_batches(self.index.encoder, spread(units, plan.workers), batch_size=self.batch_size,
                                     workers=plan.workers, decode=self.decode, clock=self.clock,
                                     first_batch=first_batch):
            if batch.errors or batch.failures:
                with self.clock.stage("write"):
                    sink.errors(batch.errors)
                    sink.failures(batch.failures)
            yield batch

    def _streaming(self, work: Iterator[list[Any]], sink: RunSink) -> None:
        """Chunk after chunk of the streamed units; score as batches arrive (a scorer with ``chunk`` > 1,
        the rerank, gets that many images at once). The model is loaded only when there is something to
        encode: a rerun with everything done costs the listing alone."""
        buffered: list[tuple[list[Sample], np.ndarray]] = []
        marks: list[UnitDone] = []  # units read to their end: written after their rows
        clock = self.clock
        # rows are written by a thread while the next batch computes; measured runs write in line, so that
        # the time of each stage is its own
        writer = WriterThread(sink.rows) if not clock.measured else None

        def flush() -> None:
            if not buffered and not marks:
                return
            samples = [s for ss, _ in buffered for s in ss]
            emb = np.concatenate([e for _, e in buffered]) if buffered else None
            done = list(marks)
            buffered.clear()
            marks.clear()
            ids = scores = stage1 = None
            if emb is not None:
                with clock.stage("score"):
                    scored = self.scorer(emb)
                ids, scores = scored
                stage1 = getattr(scored, "stage1", None)  # CODER*: what stage 1 ranked first
            if writer is not None:
                writer.put(samples, ids, scores, emb, stage1, done)
            else:
                with clock.stage("write"):
                    sink.rows(samples, ids, scores, emb, stage1, done)

        plan_ctx = None
        failed = False
        first_batch = {"pending": True}
        try:
            for units in work:
                if not units:
                    continue
                if plan_ctx is None:
                    plan_ctx = parallel_encoding(self.index.encoder, threads=self.threads, workers=self.workers)
                    plan = plan_ctx.__enter__()
                if sink.bar is not None and units[0].single:  # one image a unit: the total is known
                    sink.bar.total = (sink.bar.total or 0) + len(units)
                    sink.bar.refresh()
                for batch in self._batches(units, plan, sink, first_batch):
                    if batch.embeddings is not None:
                        buffered.append((batch.samples, batch.embeddings))
                    marks.extend(batch.done)
                    if sum(len(ss) for ss, _ in buffered) >= self.scorer.chunk:
                        flush()
                    sink.seen(len(batch.samples) + len(batch.errors) + len(batch.failures))
            flush()
        except BaseException:
            failed = True
            raise
        finally:
            try:
                if writer is not None:
                    try:
                        writer.close()
                    except BaseException:
                        if not failed:  # the run's own error, if it has one, is the one to report
                            raise
            finally:
                if plan_ctx is not None:
                    plan_ctx.__exit__(None, None, None)

    def _two_passes(self, work: Iterator[list[Any]], sink: RunSink) -> None:
        """Encode everything to a scratch file (appended as batches come: a stream's length is not known
        before), let the scorer see all of it (X-MoRe's normalisers, saved with the run), then score in
        chunks and write; units are marked done after their rows."""
        encoder = self.index.encoder
        marks: list[UnitDone] = []
        samples: list[Sample] = []
        plan_ctx = None
        with tempfile.TemporaryDirectory(prefix="coder-index-run-") as tmp:
            scratch = Path(tmp) / "emb.f32"
            try:
                with open(scratch, "wb") as f:
                    for units in work:
                        if not units:
                            continue
                        if plan_ctx is None:
                            plan_ctx = parallel_encoding(encoder, threads=self.threads, workers=self.workers)
                            plan = plan_ctx.__enter__()
                        for batch in self._batches(units, plan, sink):
                            if batch.embeddings is not None:
                                f.write(np.ascontiguousarray(batch.embeddings, dtype=np.float32).tobytes())
                                samples += batch.samples
                            marks.extend(batch.done)
                            sink.seen(len(batch.samples) + len(batch.errors) + len(batch.failures))
            finally:
                if plan_ctx is not None:
                    plan_ctx.__exit__(None, None, None)
            if samples:
                emb_all = np.memmap(scratch, dtype=np.float32, mode="r", shape=(len(samples), encoder.embed_dim))
                state = self.scorer.prepare(emb_all, sink.run.state)
                if state:
                    sink.run.save_state(**state)
                chunk = self.scorer.chunk
                for s in tqdm(range(0, len(samples), chunk), desc="scoring images (X-MoRe)", unit="chunk",
                              disable=not self.progress):
                    emb = np.asarray(emb_all[s:s + chunk])
                    sink.rows(samples[s:s + chunk], *self.scorer(emb), emb)
                del emb_all
            sink.rows([], None, None, None, None, marks)
