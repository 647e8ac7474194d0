"""Classify every image under a folder with CODER; resumable, streaming, errors reported not fatal."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..index.text_index import TextIndex
from ..predict import softmax, top_k
from .discover import discover_images
from .loader import iterate_batches
from .output import ErrorWriter, ResultWriter, errors_path_for


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

    @property
    def images_per_second(self) -> float:
        return (self.classified + self.errors) / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_second": round(self.images_per_second, 2)}


def classify_folder(index: TextIndex, folder: str | Path, out: str | Path, *, top_k_n: int = 5,
                    batch_size: int = 64, workers: int = 2, progress: bool = True,
                    on_batch: Callable[[int], None] | None = None,
                    reranker: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
                    rerank_chunk: int = 2048, scorer: Callable[[np.ndarray], np.ndarray] | None = None,
                    method: str | None = None) -> ClassifySummary:
    """Write one prediction row per decodable image of ``folder`` to ``out`` (.csv or .jsonl) and one
    row per undecodable file to ``<out stem>.errors.csv``. Rows already there are kept and skipped.

    With ``reranker`` (stage 2, e.g. a PairReranker), images are reranked in chunks of
    ``rerank_chunk`` so that pair texts missing for a whole chunk are generated concurrently.
    ``scorer`` replaces the CODER stage-1 logits (e.g. a few-shot adapter), named ``method``.
    """
    if top_k_n < 1:
        raise ValueError("top_k must be at least 1")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    t0 = time.perf_counter()
    found = discover_images(folder)
    results = ResultWriter(out, top_k_n)
    errors = ErrorWriter(errors_path_for(out))
    # Rows name files as FOLDER/relative so that one --out reused for another folder cannot collide.
    prefix = Path(os.path.normpath(folder)).as_posix().rstrip("/") + "/"
    done = results.done_paths() | errors.done_paths()
    todo = [p for p in found.images if prefix + p not in done]

    encoder = index.encoder
    score = scorer if scorer is not None else (lambda x: index.classifier().logits(x, normalized=True))
    names = index.class_names()
    method = method or ("coder*" if reranker is not None else "coder")
    n_ok = n_err = 0
    buffered: list[tuple[list[str], np.ndarray]] = []

    def flush() -> int:
        if not buffered:
            return 0
        paths = [p for ps, _ in buffered for p in ps]
        emb = np.concatenate([e for _, e in buffered])
        buffered.clear()
        logits = score(emb)
        probs = softmax(logits.astype(np.float64))
        ids, _ = top_k(probs, max(top_k_n, 5 if reranker else 1))
        final = reranker(emb, logits) if reranker is not None else ids[:, 0]
        rows = []
        for n, p in enumerate(paths):
            order = [int(final[n])] + [int(c) for c in ids[n] if c != final[n]]
            tops = [{"label": names[c], "score": float(probs[n, c])} for c in order[:top_k_n]]
            rows.append({"path": prefix + p, "label": tops[0]["label"], "score": tops[0]["score"],
                         "method": method, "top_k": tops})
        results.write(rows)
        return len(rows)

    chunk = rerank_chunk if reranker is not None else 1
    bar = tqdm(total=len(todo), unit="img", desc="classifying", disable=not progress, smoothing=0.1)
    try:
        for batch in iterate_batches(found.root, todo, encoder.preprocess, batch_size=batch_size,
                                     workers=workers):
            if batch.pixels is not None:
                buffered.append((batch.paths, encoder.encode_image_batch(batch.pixels)))
            if sum(len(ps) for ps, _ in buffered) >= chunk:
                n_ok += flush()
            errors.write([(prefix + p, reason) for p, reason in batch.errors])
            n_err += len(batch.errors)
            bar.update((len(batch.paths) if batch.pixels is not None else 0) + len(batch.errors))
            if on_batch is not None:
                on_batch(n_ok + n_err)
        n_ok += flush()
    finally:
        bar.close()
        results.close()
        errors.close()
    return ClassifySummary(len(found.images), len(found.images) - len(todo), n_ok, n_err,
                           found.other_files, time.perf_counter() - t0, str(out), str(errors.path))
