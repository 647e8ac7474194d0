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
                    on_batch: Callable[[int], None] | None = None) -> ClassifySummary:
    """Write one prediction row per decodable image of ``folder`` to ``out`` (.csv or .jsonl) and one
    row per undecodable file to ``<out stem>.errors.csv``. Rows already there are kept and skipped."""
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
    classifier = index.classifier()
    names = index.class_names()
    n_ok = n_err = 0
    bar = tqdm(total=len(todo), unit="img", desc="classifying", disable=not progress, smoothing=0.1)
    try:
        for batch in iterate_batches(found.root, todo, encoder.preprocess, batch_size=batch_size,
                                     workers=workers):
            rows = []
            if batch.pixels is not None:
                emb = encoder.encode_image_batch(batch.pixels)
                probs = softmax(classifier.logits(emb, normalized=True).astype(np.float64))
                ids, scores = top_k(probs, top_k_n)
                rows = [{"path": prefix + p, "label": names[i[0]], "score": float(s[0]), "method": "coder",
                         "top_k": [{"label": names[c], "score": float(v)} for c, v in zip(i, s, strict=True)]}
                        for p, i, s in zip(batch.paths, ids, scores, strict=True)]
            results.write(rows)
            errors.write([(prefix + p, reason) for p, reason in batch.errors])
            n_ok += len(rows)
            n_err += len(batch.errors)
            bar.update(len(rows) + len(batch.errors))
            if on_batch is not None:
                on_batch(n_ok + n_err)
    finally:
        bar.close()
        results.close()
        errors.close()
    return ClassifySummary(len(found.images), len(found.images) - len(todo), n_ok, n_err,
                           found.other_files, time.perf_counter() - t0, str(out), str(errors.path))
