"""Classify every image under a folder: one runner for every scorer (CODER, CODER*, adapters, X-MoRe).

discover (regular files only) -> skip what OUT already holds -> decode/preprocess in workers ->
encode -> score -> write rows; resumable, streaming, errors reported not fatal. The output's lock,
provenance and resume live in ``runrecord.OutputRun``; what a method computes lives in its scorer.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from ..faults import pause_point
from ..index.atomic import translate_disk_full
from ..parallelism import parallel_encoding
from .discover import discover_images
from .loader import iterate_batches
from .runrecord import OutputRun
from .scorers import CoderScorer

if TYPE_CHECKING:
    from ..index.text_index import TextIndex


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
    special: int = 0      # FIFOs, sockets, devices, broken links named like images: skipped, listed as errors

    @property
    def images_per_second(self) -> float:
        return (self.classified + self.errors) / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_second": round(self.images_per_second, 2)}


def classify_folder(index: TextIndex, folder: str | Path, out: str | Path, *, scorer: Any | None = None,
                    top_k_n: int = 5, batch_size: int = 64, workers: int | None = None, threads: int | None = None,
                    progress: bool = True, overwrite: bool = False,
                    on_batch: Callable[[int], None] | None = None) -> ClassifySummary:
    """Write one prediction row per decodable image of ``folder`` to ``out`` (.csv or .jsonl) and one
    row per file that gave none to ``<out stem>.errors.csv``. Rows already there are kept and
    skipped; a rerun with other settings is refused (``overwrite`` starts afresh). ``workers`` and
    ``threads`` default to a choice from the cores and the model (``parallelism.choose``)."""
    if top_k_n < 1:
        raise ValueError("top_k must be at least 1")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    t0 = time.perf_counter()
    scorer = scorer or CoderScorer(index, top_k_n)
    provenance = {"index": index.provenance(), "top_k": top_k_n, **scorer.provenance()}
    with OutputRun(out, top_k_n, provenance, overwrite=overwrite) as run:
        pause_point("classify.locked")
        found = discover_images(folder)
        # Rows name files as FOLDER/relative so that one --out reused for another folder cannot collide.
        prefix = Path(os.path.normpath(folder)).as_posix().rstrip("/") + "/"
        done = run.done_paths()
        todo = [p for p in found.images if prefix + p not in done]
        special = [(prefix + p, why) for p, why in found.special if prefix + p not in done]
        run.errors.write(special)
        encoder = index.encoder
        names = index.class_names()
        counts = {"ok": 0, "err": len(special)}

        def write(paths: list[str], emb: np.ndarray) -> None:
            ids, scores = scorer(emb)
            method = scorer.method
            run.results.write([
                {"path": prefix + p, "label": names[i[0]], "score": float(s[0]), "method": method,
                 "top_k": [{"label": names[c], "score": float(v)} for c, v in zip(i, s, strict=True)]}
                for p, i, s in zip(paths, ids, scores, strict=True)])
            counts["ok"] += len(paths)

        def batches() -> Any:
            for batch in iterate_batches(found.root, todo, encoder.preprocess, batch_size=batch_size,
                                         workers=plan.workers):
                run.errors.write([(prefix + p, reason) for p, reason in batch.errors])
                counts["err"] += len(batch.errors)
                emb = encoder.encode_image_batch(batch.pixels) if batch.pixels is not None else None
                yield batch, emb

        bar = tqdm(total=len(todo), unit="img",
                   desc="classifying images" if not scorer.two_pass else "encoding images",
                   disable=not progress, smoothing=0.1)
        try:
            with translate_disk_full(out), parallel_encoding(encoder, threads=threads, workers=workers) as plan:
                if scorer.two_pass:
                    _two_passes(run, scorer, batches(), write, len(todo), encoder.embed_dim, bar, on_batch, counts,
                                progress)
                else:
                    _streaming(scorer, batches(), write, bar, on_batch, counts)
        finally:
            bar.close()
    return ClassifySummary(len(found.images), len(found.images) - len(todo), counts["ok"], counts["err"],
                           found.other_files, time.perf_counter() - t0, str(out), str(run.errors.path),
                           found.hidden, len(found.special))


def _streaming(scorer: Any, batches: Any, write: Callable, bar: Any, on_batch: Any, counts: dict[str, int]) -> None:
    """Score as batches arrive; a scorer with ``chunk`` > 1 (the rerank) gets that many images at once."""
    buffered: list[tuple[list[str], np.ndarray]] = []

    def flush() -> None:
        if buffered:
            paths = [p for ps, _ in buffered for p in ps]
            emb = np.concatenate([e for _, e in buffered])
            buffered.clear()
            write(paths, emb)

    for batch, emb in batches:
        if emb is not None:
            buffered.append((batch.paths, emb))
        if sum(len(ps) for ps, _ in buffered) >= scorer.chunk:
            flush()
        bar.update(len(batch.paths) + len(batch.errors))
        if on_batch is not None:
            on_batch(counts["ok"] + counts["err"])
    flush()


def _two_passes(run: OutputRun, scorer: Any, batches: Any, write: Callable, n: int, dim: int, bar: Any,
                on_batch: Any, counts: dict[str, int], progress: bool) -> None:
    """Encode everything to a memory-mapped scratch file, let the scorer see all of it (X-MoRe's
    normalisers, saved with the run), then score in chunks and write."""
    with tempfile.TemporaryDirectory(prefix="coder-index-run-") as tmp:
        emb_all = np.lib.format.open_memmap(Path(tmp) / "emb.npy", mode="w+", dtype=np.float32,
                                            shape=(max(n, 1), dim))
        paths: list[str] = []
        for batch, emb in batches:
            if emb is not None:
                emb_all[len(paths):len(paths) + len(batch.paths)] = emb
                paths += batch.paths
            bar.update(len(batch.paths) + len(batch.errors))
        if not paths:
            return
        state = scorer.prepare(emb_all[: len(paths)], run.state)
        if state:
            run.save_state(**state)
        for s in tqdm(range(0, len(paths), scorer.chunk), desc="scoring images (X-MoRe)", unit="chunk",
                      disable=not progress):
            write(paths[s:s + scorer.chunk], np.asarray(emb_all[s:s + scorer.chunk][: len(paths) - s]))
            if on_batch is not None:
                on_batch(counts["ok"] + counts["err"])
        del emb_all
