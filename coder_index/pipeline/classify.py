"""Classify every image under a folder: one runner for every scorer (CODER, CODER*, adapters, X-MoRe).

discover (regular files only) -> skip what OUT already holds -> decode/preprocess in workers ->
encode -> score -> write rows; resumable, streaming, errors reported not fatal. The output's lock,
provenance and resume live in ``runrecord.OutputRun``; what a method computes lives in its scorer.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from coder_index.core.atomic import translate_disk_full
from coder_index.core.faults import crash_point, pause_point
from coder_index.core.parallelism import parallel_encoding
from coder_index.methods.scorers import CoderScorer
from coder_index.pipeline.discover import Discovery, ListedFiles, walk_images, walk_listed
from coder_index.pipeline.embeddings_out import EmbeddingSaver
from coder_index.pipeline.encode_images import encoded_batches, requested_decode
from coder_index.pipeline.runrecord import OutputRun
from coder_index.pipeline.shard_stream import ShardPlan, done_keys_by_shard
from coder_index.pipeline.shards import ShardFiles, needs_streaming, walk_shards

if TYPE_CHECKING:
    from coder_index.methods.text_index import TextIndex

log = logging.getLogger(__name__)


@dataclass
class ClassifySummary:
    found: int            # image files discovered
    already_done: int     # rows (or errors) from earlier runs, skipped
    classified: int       # rows written by this run
    errors: int           # files that could not be decoded in this run
    other_files: int      # non-image files ignored
    seconds: float
    out: str
    errors_file: str
    hidden: int = 0       # hidden files and folders skipped
    special: int = 0      # inputs skipped before decoding (missing, not regular files, ...): listed as errors
    rows_in_out: int = 0      # rows OUT holds now (earlier runs' and this run's, any folder)
    errors_in_file: int = 0   # files the errors file lists now
    embeddings_dir: str | None = None   # --save-embeddings
    embeddings_saved: int = 0           # rows whose embeddings DIR holds now
    special_kinds: dict[str, int] = field(default_factory=dict)  # why inputs were skipped: kind -> count

    @property
    def images_per_second(self) -> float:
        return (self.classified + self.errors) / self.seconds if self.seconds > 0 else 0.0

    @property
    def out_exists(self) -> bool:
        return Path(self.out).exists()

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_second": round(self.images_per_second, 2)}


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


class _WriterThread:
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


class _NoClock:
    measured = False

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        yield


PENDING_CHUNK = 16384  # images handed to the loader at a time: the file list is streamed, never held whole


def classify_folder(index: TextIndex, folder: str | Path | ListedFiles | ShardFiles, out: str | Path, *,
                    scorer: Any | None = None,
                    top_k_n: int = 5, batch_size: int = 64, workers: int | None = None, threads: int | None = None,
                    progress: bool = True, overwrite: bool = False, engine: Any | None = None,
                    on_batch: Callable[[int], None] | None = None, decode: str = "cpu",
                    clock: StageClock | None = None, save_embeddings: EmbeddingSaver | None = None) -> ClassifySummary:
    """Write one prediction row per decodable image of ``folder`` (or of the files a ``ListedFiles``
    names, each row naming its file as given; or of the samples of ``ShardFiles``' webdataset
    shards, each row named ``SHARD/KEY``) to ``out`` (.csv or .jsonl) and one
    row per file that gave none to ``OUT.errors.csv``. Rows already there are kept and
    skipped; a rerun with other settings is refused (``overwrite`` starts afresh). ``workers`` and
    ``threads`` default to a choice from the cores and the model (``parallelism.choose``).
    ``engine`` (e.g. ``engines.ray_engine.RayEngine``) decodes, encodes and scores elsewhere; rows
    are written here, by this one process, so resume and one row per image hold for every engine.
    ``decode`` chooses the feed (``feed.make_feed``): ``cpu`` open_clip's reference preprocessing,
    ``gpu`` JPEGs decoded in batches where the encoder runs, ``auto`` the latter on a CUDA device.
    ``clock`` (a ``StageClock``) collects the seconds per stage of the local engine's streaming run.
    ``save_embeddings`` (an ``EmbeddingSaver``, not yet opened) keeps the rows' image embeddings in
    clip-retrieval's layout, committed with the rows (see ``embeddings_out``)."""
    if top_k_n < 1:
        raise ValueError("top_k must be at least 1")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    t0 = time.perf_counter()
    scorer = scorer or CoderScorer(index, top_k_n)
    provenance = {"index": index.provenance(), "top_k": top_k_n, **scorer.provenance()}
    if requested_decode(decode, index.compute_device) == "gpu":
        # the tensor decoder's pixels differ from the reference's by rounding: a resumed run must not mix
        # them (the reference, as every earlier version used, is not recorded: old runs resume)
        provenance["decode"] = "gpu"
    with OutputRun(out, top_k_n, provenance, overwrite=overwrite) as run:
        pause_point("classify.locked")
        stream: ShardPlan | None = None
        if isinstance(folder, ListedFiles):
            root, prefix = Path.cwd(), ""  # listed paths are read as given, relative to the working directory
            found = Discovery(root, [], 0)
            listed = walk_listed(folder.paths, found)
        elif isinstance(folder, ShardFiles) and needs_streaming(folder.shards):
            root, prefix = Path.cwd(), ""  # rows are SHARD/KEY, the shard's public name (shard_stream)
            found = Discovery(root, [], 0)
            listed = iter(())
            stream = ShardPlan(list(folder.shards))
        elif isinstance(folder, ShardFiles):
            root, prefix = Path.cwd(), ""  # rows are SHARD/KEY, the shard's path as given
            found = Discovery(root, [], 0)
            listed = walk_shards(folder.shards, found)
        else:
            root = Path(folder)
            if not root.is_dir():
                raise NotADirectoryError(f"{root} is not a directory; pass the folder that holds the images, or "
                                         "image files")
            found = Discovery(root, [], 0)
            listed = walk_images(root, found)
            # Rows name files as FOLDER/relative so that one --out reused for another folder cannot collide.
            prefix = Path(os.path.normpath(folder)).as_posix().rstrip("/") + "/"
        run.record_inputs(_inputs_of(folder, root))
        done = run.done_paths()
        if stream is not None:  # what OUT holds per shard, and the shards read to their end before
            stream.complete = run.shards_done()
            stream.done_keys = done_keys_by_shard(stream.names(), done)
        saver = save_embeddings.open(done) if save_embeddings is not None else None
        if saver is not None and engine is not None:
            engine.return_embeddings = True
        names = index.class_names()
        counts = {"ok": 0, "err": 0, "special_seen": 0}

        def todo_chunks() -> Iterator[list[str]]:
            if stream is not None:  # one plan: the workers stream the shards, the plan's done keys skipped
                yield stream  # type: ignore[misc]
                return
            chunk: list[str] = []
            for rel in listed:
                if prefix + rel not in done:
                    chunk.append(rel)
                    if len(chunk) >= PENDING_CHUNK:
                        yield chunk
                        chunk = []
                write_special()
            write_special()
            if chunk:
                yield chunk

        def write_special() -> None:  # FIFOs and the like, as discovery meets them
            new = found.special[counts["special_seen"]:]
            if new:
                counts["special_seen"] = len(found.special)
                rows = [(prefix + p, why) for p, why in new if prefix + p not in done]
                run.errors.write(rows)
                counts["err"] += len(rows)

        def write(paths: list[str], ids: np.ndarray, scores: np.ndarray, emb: np.ndarray | None = None,
                  shards_done: list[tuple[str, dict[str, int]]] = (), stage1: Any = None) -> None:
            row_paths = [prefix + p for p in paths]
            if paths:
                if saver is not None:  # embeddings first: a kill never leaves a row without its embedding
                    saver.append(row_paths, emb, paths)
                run.results.write(prediction_rows(row_paths, ids, scores, names, scorer.method, stage1))
                crash_point("classify.rows_written")  # tests: killed with these rows written, the run not done
                counts["ok"] += len(paths)
                if saver is not None:
                    saver.commit()
            if shards_done:  # after their rows: a resumed run need not open them again
                for _, c in shards_done:
                    found.found += c.get("found", 0)
                    found.hidden += c.get("hidden", 0)
                    found.other_files += c.get("other", 0)
                run.mark_shards_done([name for name, _ in shards_done])

        def write_errors(errors: list[tuple[str, str]]) -> None:
            run.errors.write([(prefix + p, reason) for p, reason in errors])
            counts["err"] += len(errors)

        # delay: the bar appears once its total is known (no stray "0img" line before it)
        bar = tqdm(unit="img", desc="classifying images" if not scorer.two_pass else "encoding images",
                   disable=not progress, smoothing=0.1, delay=1.0)
        failed = False
        try:
            with translate_disk_full(out):
                if engine is not None:
                    engine.run(root, todo_chunks(), write, write_errors, bar, on_batch, counts)
                elif scorer.two_pass:
                    # X-MoRe needs every embedding first
                    todo = stream if stream is not None else [p for chunk in todo_chunks() for p in chunk]
                    bar.reset(total=len(todo) or None)
                    _two_passes(run, scorer, index, root, todo, batch_size, workers, threads, write, write_errors,
                                bar, on_batch, counts, progress, decode)
                else:
                    _streaming(scorer, index, root, todo_chunks(), batch_size, workers, threads, write,
                               write_errors, bar, on_batch, counts, decode, clock or _NoClock())
        except BaseException:
            failed = True
            raise
        finally:
            bar.close()
            if saver is not None:
                saver.close(finish=not failed)  # after a failure the next run settles what is staged
    classified_or_failed = counts["ok"] + counts["err"]
    already = run.earlier["rows"] + run.earlier["errors"] if stream is not None else \
        max(0, found.found + len(found.special) - classified_or_failed)
    return ClassifySummary(found.found, already,
                           counts["ok"], counts["err"], found.other_files, time.perf_counter() - t0, str(out),
                           str(run.errors.path), found.hidden, len(found.special),
                           run.earlier["rows"] + counts["ok"], run.earlier["errors"] + counts["err"],
                           str(saver.dir) if saver is not None else None, saver.saved if saver is not None else 0,
                           special_kinds(found.special))


MAX_RECORDED_SHARDS = 100_000


def _inputs_of(folder: Any, root: Path) -> dict[str, Any]:
    """What the run reads, for its record: explain and serve find each row's image from it."""
    from coder_index.core.remote import public_url

    cwd = os.getcwd()
    if isinstance(folder, ListedFiles):
        return {"cwd": cwd, "kind": "files"}
    if isinstance(folder, ShardFiles):
        return {"cwd": cwd, "kind": "shards",
                "shards": [public_url(s) for s in folder.shards[:MAX_RECORDED_SHARDS]]}
    return {"cwd": cwd, "kind": "folder", "folders": [os.path.abspath(root)]}


def special_kinds(special: list[tuple[str, str]]) -> dict[str, int]:
    """Why inputs were skipped before decoding, counted by kind, for the summary's words."""
    from collections import Counter

    def kind(reason: str) -> str:
        r = reason.lower()
        if "no such shard" in r:
            return "missing shard(s)"
        if "a webdataset shard, not an image" in r:
            return "shard(s) in a file list"
        if "no such file" in r or "broken symbolic link" in r:
            return "missing file(s)"
        if "no image in this sample" in r:
            return "sample(s) without an image"
        if "a second image in sample" in r:
            return "extra image(s) in a sample"
        if "a directory" in r:
            return "folder(s) named as image files"
        if "not a regular file" in r or "fifo" in r or "socket" in r or "device" in r:
            return "FIFO(s), socket(s) or device(s)"
        if "shard" in r or "tar" in r:
            return "shard(s) not read to the end"
        return "other input(s) that could not be opened"

    return dict(Counter(kind(reason) for _, reason in special))


def prediction_rows(paths: list[str], ids: np.ndarray, scores: np.ndarray, names: list[str],
                    method: str, stage1: tuple[np.ndarray, np.ndarray] | None = None) -> list[dict[str, Any]]:
    """One output row per image (what .jsonl holds; .csv flattens ``top_k``), best class first.
    ``stage1`` (CODER* rows): CODER's own first class and probability per row, kept as ``stage1``."""
    rows = [{"path": p, "label": names[i[0]], "score": float(s[0]), "method": method,
             "top_k": [{"label": names[c], "score": float(v)} for c, v in zip(i, s, strict=True)]}
            for p, i, s in zip(paths, ids, scores, strict=True)]
    if stage1 is not None:
        for row, c, v in zip(rows, stage1[0], stage1[1], strict=True):
            if c >= 0:
                row["stage1"] = {"label": names[int(c)], "score": float(v)}
    return rows


def _local_batches(index: TextIndex, root: Path, todo: list[str], batch_size: int, plan: Any,
                   write_errors: Callable, decode: str = "cpu", clock: Any = None,
                   first_batch: dict[str, bool] | None = None
                   ) -> Iterator[tuple[list[str], np.ndarray | None, int, list[tuple[str, dict[str, int]]]]]:
    """(items, embeddings, errors, shards read to their end) per batch of the one feed
    (``encode_images``); errors written here."""
    for batch in encoded_batches(index.encoder, root, todo, batch_size=batch_size, workers=plan.workers,
                                 decode=decode, clock=clock, first_batch=first_batch):
        if batch.errors:
            with (clock or _NoClock()).stage("write"):
                write_errors(batch.errors)
        if batch.embeddings is not None or batch.errors or batch.done_shards:
            yield batch.items, batch.embeddings, len(batch.errors), batch.done_shards


def _streaming(scorer: Any, index: TextIndex, root: Path, chunks: Iterator[list[str]], batch_size: int,
               workers: int | None, threads: int | None, write: Callable, write_errors: Callable, bar: Any,
               on_batch: Any, counts: dict[str, int], decode: str = "cpu", clock: Any = None) -> None:
    """Decode and encode here, chunk after chunk of the streamed file list; score as batches arrive
    (a scorer with ``chunk`` > 1, the rerank, gets that many images at once). The model is loaded
    only when there is something to encode: a rerun with everything done costs the listing alone."""
    buffered: list[tuple[list[str], np.ndarray]] = []
    marks: list[tuple[str, dict[str, int]]] = []  # streamed shards read to their end: written after the rows
    clock = clock or _NoClock()
    # rows are written by a thread while the next batch computes; measured runs write in line, so that
    # the time of each stage is its own
    writer = _WriterThread(write) if isinstance(clock, _NoClock) else None

    def flush() -> None:
        if buffered or marks:
            paths = [p for ps, _ in buffered for p in ps]
            emb = np.concatenate([e for _, e in buffered]) if buffered else None
            done = list(marks)
            buffered.clear()
            marks.clear()
            ids = scores = stage1 = None
            if emb is not None:
                with clock.stage("score"):
                    scored = scorer(emb)
                ids, scores = scored
                stage1 = getattr(scored, "stage1", None)  # CODER*: what stage 1 ranked first
            if writer is not None:
                writer.put(paths, ids, scores, emb, done, stage1)
            else:
                with clock.stage("write"):
                    write(paths, ids, scores, emb, done, stage1)

    plan_ctx = None
    failed = False
    first_batch = {"pending": True}
    try:
        for todo in chunks:
            if plan_ctx is None:
                plan_ctx = parallel_encoding(index.encoder, threads=threads, workers=workers)
                plan = plan_ctx.__enter__()
            if len(todo):  # a stream of shards (ShardPlan) says nothing ahead: the bar counts up
                bar.total = (bar.total or 0) + len(todo)
                bar.refresh()
            for paths, emb, n_err, done in _local_batches(index, root, todo, batch_size, plan, write_errors, decode,
                                                          clock, first_batch):
                if emb is not None:
                    buffered.append((paths, emb))
                marks.extend(done)
                if sum(len(ps) for ps, _ in buffered) >= scorer.chunk:
                    flush()
                bar.update(len(paths) + n_err)
                if on_batch is not None:
                    on_batch(counts["ok"] + counts["err"])
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


def _two_passes(run: OutputRun, scorer: Any, index: TextIndex, root: Path, todo: Any, batch_size: int,
                workers: int | None, threads: int | None, write: Callable, write_errors: Callable, bar: Any,
                on_batch: Any, counts: dict[str, int], progress: bool, decode: str = "cpu") -> None:
    """Encode everything to a scratch file (appended as batches come: a stream's length is not known
    before), let the scorer see all of it (X-MoRe's normalisers, saved with the run), then score in
    chunks and write; streamed shards are marked read after their rows."""
    if not isinstance(todo, ShardPlan) and not todo:
        return
    encoder = index.encoder
    marks: list[tuple[str, dict[str, int]]] = []
    with tempfile.TemporaryDirectory(prefix="coder-index-run-") as tmp, \
            parallel_encoding(encoder, threads=threads, workers=workers) as plan:
        scratch = Path(tmp) / "emb.f32"
        paths: list[str] = []
        with open(scratch, "wb") as f:
            for batch_paths, emb, n_err, done in _local_batches(index, root, todo, batch_size, plan, write_errors,
                                                                decode):
                if emb is not None:
                    f.write(np.ascontiguousarray(emb, dtype=np.float32).tobytes())
                    paths += batch_paths
                marks.extend(done)
                bar.update(len(batch_paths) + n_err)
        if paths:
            emb_all = np.memmap(scratch, dtype=np.float32, mode="r", shape=(len(paths), encoder.embed_dim))
            state = scorer.prepare(emb_all, run.state)
            if state:
                run.save_state(**state)
            for s in tqdm(range(0, len(paths), scorer.chunk), desc="scoring images (X-MoRe)", unit="chunk",
                          disable=not progress):
                emb = np.asarray(emb_all[s:s + scorer.chunk])
                write(paths[s:s + scorer.chunk], *scorer(emb), emb)
                if on_batch is not None:
                    on_batch(counts["ok"] + counts["err"])
            del emb_all
        write([], None, None, None, marks)
