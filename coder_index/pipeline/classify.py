"""Classify every image of a source (a folder, listed files, shards, parquet files): one runner for
every scorer (CODER, CODER*, adapters, X-MoRe) and every engine (local, Ray).

source -> its units, minus what OUT already holds -> an engine (decode/preprocess in workers ->
encode -> score) -> the run's sink (rows, errors, read failures, units done); resumable, streaming,
errors reported not fatal. The output's lock, provenance and resume live in ``runrecord.OutputRun``;
what a method computes lives in its scorer; what an input is lives in its source (``sources``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from coder_index.core.atomic import translate_disk_full
from coder_index.core.faults import pause_point
from coder_index.methods.scorers import CoderScorer
from coder_index.pipeline.embeddings_out import EmbeddingSaver
from coder_index.pipeline.feed import resolve_decode
from coder_index.pipeline.local_engine import LocalEngine, StageClock, WriterThread  # noqa: F401 - re-exported
from coder_index.pipeline.run_sink import RunSink, prediction_rows  # noqa: F401 - prediction_rows re-exported
from coder_index.pipeline.runrecord import OutputRun
from coder_index.pipeline.sources.base import ItemError, ReadFailure, with_skip

if TYPE_CHECKING:
    from coder_index.methods.text_index import TextIndex

log = logging.getLogger(__name__)


@dataclass
class ClassifySummary:
    found: int            # images this run met (read, or already in OUT)
    already_done: int     # rows (or errors) from earlier runs, skipped
    classified: int       # rows written by this run
    errors: int           # inputs that gave no row in this run, for good (listed in the errors file)
    other_files: int      # non-image files ignored
    seconds: float
    out: str
    errors_file: str
    hidden: int = 0       # hidden files and folders skipped
    special: int = 0      # inputs skipped before decoding (not regular files, samples without an image, ...)
    rows_in_out: int = 0      # rows OUT holds now (earlier runs' and this run's, any folder)
    errors_in_file: int = 0   # inputs the errors file lists now
    embeddings_dir: str | None = None   # --save-embeddings
    embeddings_saved: int = 0           # rows whose embeddings DIR holds now
    special_kinds: dict[str, int] = field(default_factory=dict)  # why inputs were skipped: kind -> count
    failed: list[tuple[str, str]] = field(default_factory=list)  # (what, why) could not be read: a rerun retries
    retried: int = 0      # rows of earlier runs that could not be read, tried again by this one
    what: str = "the inputs hold"   # the source, for messages ("the shards hold", "photos/ holds")

    @property
    def images_per_second(self) -> float:
        return (self.classified + self.errors) / self.seconds if self.seconds > 0 else 0.0

    @property
    def out_exists(self) -> bool:
        return Path(self.out).exists()

    @property
    def complete(self) -> bool:
        """Everything was read (a rerun has nothing left to retry)."""
        return not self.failed

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_second": round(self.images_per_second, 2)}


PENDING_CHUNK = 16384  # units handed to the engine at a time: the source's list is streamed, never held whole


def as_source(source: Any) -> Any:
    """A source (``sources``) as given, or a folder's path."""
    if not isinstance(source, (str, Path)):
        return source
    from coder_index.pipeline.sources.folder import FolderSource

    return FolderSource(source)


def classify_folder(index: TextIndex, source: Any, out: str | Path, *, scorer: Any | None = None,
                    top_k_n: int = 5, batch_size: int = 64, workers: int | None = None, threads: int | None = None,
                    progress: bool = True, overwrite: bool = False, engine: Any | None = None,
                    on_batch: Callable[[int], None] | None = None, decode: str = "cpu",
                    clock: StageClock | None = None, save_embeddings: EmbeddingSaver | None = None) -> ClassifySummary:
    """Write one prediction row per decodable image of ``source`` (``sources.resolve.open_source``, or
    a folder's path) to ``out`` (.csv or .jsonl), and one row per input that gave none to
    ``OUT.errors.csv`` (``retry`` set for what could not be read: the next run reads it again). Rows
    already there are kept and skipped; a rerun with other settings is refused (``overwrite`` starts
    afresh). ``workers`` and ``threads`` default to a choice from the cores and the model
    (``parallelism.choose``). ``engine`` (e.g. ``engines.ray_engine.RayEngine``) decodes, encodes and
    scores elsewhere; rows are written here, by this one process, so resume and one row per image hold
    for every engine. ``decode`` chooses the feed (``feed.make_feed``): ``cpu`` open_clip's reference
    preprocessing, ``gpu`` JPEGs decoded in batches where the encoder runs, ``auto`` the latter on a
    CUDA device. ``clock`` (a ``StageClock``) collects the seconds per stage of the local engine.
    ``save_embeddings`` (an ``EmbeddingSaver``, not yet opened) keeps the rows' image embeddings in
    clip-retrieval's layout, committed with the rows (see ``embeddings_out``)."""
    if top_k_n < 1:
        raise ValueError("top_k must be at least 1")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    t0 = time.perf_counter()
    source = as_source(source)
    scorer = scorer or CoderScorer(index, top_k_n)
    provenance = {"index": index.provenance(), "top_k": top_k_n, **scorer.provenance()}
    decode = resolve_decode(decode, index.compute_device, released=index.recipe.is_released)
    if decode == "gpu":
        # the tensor decoder's pixels differ from the reference's by rounding: a resumed run must not mix
        # them (the reference, as every earlier version used, is not recorded: old runs resume)
        provenance["decode"] = "gpu"
    with OutputRun(out, top_k_n, provenance, overwrite=overwrite) as run:
        pause_point("classify.locked")
        run.record_inputs(source.record())
        done = run.done_paths()
        saver = save_embeddings.open(done) if save_embeddings is not None else None
        if saver is not None and engine is not None:
            engine.return_embeddings = True
        # delay: the bar appears once its total is known (no stray "0img" line before it)
        bar = tqdm(unit="img", desc="classifying images" if not scorer.two_pass else "encoding images",
                   disable=not progress, smoothing=0.1, delay=1.0)
        sink = RunSink(run, names=index.class_names(), method=scorer.method, saver=saver, bar=bar,
                       on_batch=on_batch)
        engine = engine or LocalEngine(index, scorer, batch_size=batch_size, workers=workers, threads=threads,
                                       decode=decode, clock=clock, progress=progress)
        failed = False
        try:
            with translate_disk_full(out):
                engine.run(work_chunks(source, done, run.units_done(), sink), sink)
        except BaseException:
            failed = True
            raise
        finally:
            bar.close()
            if saver is not None:
                saver.close(finish=not failed)  # after a failure the next run settles what is staged
    c = sink.counts
    special = sum(c.special.values())
    return ClassifySummary(
        found=c.classified + c.image_errors - special + c.already_done, already_done=c.already_done,
        classified=c.classified, errors=c.image_errors, other_files=c.other_files + source.listing.other_files,
        seconds=time.perf_counter() - t0, out=str(out), errors_file=str(run.errors.path),
        hidden=c.hidden + source.listing.hidden, special=special, rows_in_out=run.earlier["rows"] + c.classified,
        errors_in_file=run.earlier["errors"] + c.image_errors + len(c.failures),
        embeddings_dir=str(saver.dir) if saver is not None else None,
        embeddings_saved=saver.saved if saver is not None else 0, special_kinds=dict(c.special),
        failed=list(c.failures), retried=len(run.retried), what=source.what)


def work_chunks(source: Any, done: set[str], units_done: set[str], sink: RunSink) -> Iterator[list[Any]]:
    """The source's units that OUT does not hold yet, in chunks of at most ``PENDING_CHUNK``: a unit of
    one image is done when OUT holds its row (or a final error), a unit of many when ``units_done``
    names it (or a final error does); the others are told which of their images OUT holds. What fails
    while listing goes to the sink as it comes."""
    chunk: list[Any] = []
    counted: set[str] = set()  # containers whose rows in OUT are counted as done already
    for item in source.units():
        if isinstance(item, ItemError):
            if item.row in done:
                sink.counts.already_done += 1
            else:
                sink.errors([item])
            continue
        if isinstance(item, ReadFailure):
            sink.failures([item])
            continue
        if item.name in done:
            sink.counts.already_done += 1 if item.single else 0
            continue
        chunk.append(item)
        if len(chunk) >= PENDING_CHUNK:
            yield _told(chunk, done, units_done, counted, sink)
            chunk = []
    if chunk:
        yield _told(chunk, done, units_done, counted, sink)


def _told(units: list[Any], done: set[str], units_done: set[str], counted: set[str], sink: RunSink) -> list[Any]:
    """The units to read, each told the keys of its images OUT holds; complete ones left out."""
    many = [u for u in units if not u.single]
    keys = done_keys_by_prefix({u.container for u in many}, done) if many and done else {}
    for u in many:
        if u.container not in counted:
            counted.add(u.container)
            sink.counts.already_done += len(keys.get(u.container, ()))
    return [with_skip(u, keys.get(u.container, set())) for u in units if u.single or u.name not in units_done]


def done_keys_by_prefix(prefixes: set[str], done: set[str]) -> dict[str, set[str]]:
    """The keys of each container that rows (or errors) of OUT already name: ``CONTAINER/KEY`` split at
    the container's name (a URL holds slashes, a key may too)."""
    out: dict[str, set[str]] = {}
    for row in done:
        at = row.find("/")
        while at != -1:
            if row[:at] in prefixes:
                out.setdefault(row[:at], set()).add(row[at + 1:])
                break
            at = row.find("/", at + 1)
    return out
