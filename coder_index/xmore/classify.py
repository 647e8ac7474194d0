"""`classify --corpus`: X-MoRe over a folder, order-independent.

The confidence normalisers are means over the whole folder, so two passes: (1) encode every image
(to a memory-mapped scratch file) and compute the normalisers, saved next to the output as
``<out>.xmore.json``; (2) predict in chunks and write rows. A rerun after an interruption in pass 2
reuses the saved normalisers, so resumed rows are computed exactly as the first ones were.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from ..pipeline.classify import ClassifySummary
from ..pipeline.discover import discover_images
from ..pipeline.loader import iterate_batches
from ..pipeline.output import ErrorWriter, ResultWriter, errors_path_for
from ..predict import top_k
from .predict import XMore

if TYPE_CHECKING:
    from ..index.text_index import TextIndex


def classify_folder_xmore(index: TextIndex, xmore: XMore, folder: str | Path, out: str | Path, *, method: str,
                          top_k_n: int = 5, batch_size: int = 64, workers: int = 2, chunk: int = 4096,
                          progress: bool = True) -> ClassifySummary:
    t0 = time.perf_counter()
    found = discover_images(folder)
    results, errors = ResultWriter(out, top_k_n), ErrorWriter(errors_path_for(out))
    prefix = Path(os.path.normpath(folder)).as_posix().rstrip("/") + "/"
    done = results.done_paths() | errors.done_paths()
    todo = [p for p in found.images if prefix + p not in done]
    sidecar = Path(str(out) + ".xmore.json")
    settings = {"method": method, "k": xmore.k, "corpus": str(xmore.corpus.path)}
    saved = json.loads(sidecar.read_text()) if sidecar.exists() else None
    if saved is not None and {k: saved.get(k) for k in settings} != settings:
        raise ValueError(f"{out} was started with {({k: saved.get(k) for k in settings})}; resume with the same "
                         "--method/--retrieve-k/--corpus, or choose a new --out")
    encoder = index.encoder
    names = index.class_names()
    n_ok = n_err = 0
    with tempfile.TemporaryDirectory(prefix="coder-index-xmore-") as tmp:
        emb = np.lib.format.open_memmap(Path(tmp) / "emb.npy", mode="w+", dtype=np.float32,
                                        shape=(max(len(todo), 1), encoder.embed_dim))
        paths: list[str] = []
        with tqdm(total=len(todo), unit="img", desc="encoding", disable=not progress) as bar:
            for batch in iterate_batches(found.root, todo, encoder.preprocess, batch_size=batch_size,
                                         workers=workers):
                if batch.pixels is not None:
                    emb[len(paths):len(paths) + len(batch.paths)] = encoder.encode_image_batch(batch.pixels)
                    paths += batch.paths
                errors.write([(prefix + p, r) for p, r in batch.errors])
                n_err += len(batch.errors)
                bar.update(len(batch.paths) + len(batch.errors))
        if saved is None and paths:
            saved = {**settings, "normalizers": list(xmore.normalizers(emb[:len(paths)], method)),
                     "images": len(paths)}
            sidecar.write_text(json.dumps(saved, indent=2))
        try:
            for s in range(0, len(paths), chunk):
                x = np.asarray(emb[s:s + chunk][: len(paths) - s])
                probs = xmore.predict(x, method, normalizer=tuple(saved["normalizers"]))
                ids, scores = top_k(probs, top_k_n)
                results.write([{"path": prefix + p, "label": names[i[0]], "score": float(v[0]), "method": method,
                                "top_k": [{"label": names[c], "score": float(q)} for c, q in zip(i, v, strict=True)]}
                               for p, i, v in zip(paths[s:s + chunk], ids, scores, strict=True)])
                n_ok += len(x)
        finally:
            results.close()
            errors.close()
            del emb
    return ClassifySummary(len(found.images), len(found.images) - len(todo), n_ok, n_err, found.other_files,
                           time.perf_counter() - t0, str(out), str(errors.path))
