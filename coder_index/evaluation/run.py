"""`coder-index eval`: encode once (cached), run every method on the same embeddings, report."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from coder_index.core.errors import InputFormatError
from coder_index.evaluation.methods import ALL_METHODS, RERANK_METHODS, stage1_classifier
from coder_index.evaluation.report import (
    accuracy,
    most_confused,
    per_class_accuracy,
    rerank_effect,
    tsne_figure,
    tsne_unavailable,
    write_clip_benchmark,
    write_reports,
)
from coder_index.methods.coder import coder_features
from coder_index.methods.zeroshot import zero_shot_weights
from coder_index.pipeline.feed import resolve_decode
from coder_index.pipeline.labelled import LabelledSet
from coder_index.stores.embcache import EmbeddingCache, image_embedding_key

if TYPE_CHECKING:
    from coder_index.methods.text_index import TextIndex

from coder_index.core.choices import FEWSHOT_METHODS, XMORE_METHODS


def evaluate(index: TextIndex, data: LabelledSet, out_dir: str | Path, *, methods: Sequence[str] = ALL_METHODS,
             reranker_factory: Callable[[float | None], Any] | None = None, gap_threshold: float = 0.3,
             cache_path: str | Path | None = None, batch_size: int = 64, workers: int | None = None,
             threads: int | None = None, tsne_samples: int = 1000, data_name: str = "", progress: bool = False,
             fewshot: Any | None = None, xmore: Any | None = None, prompts: str = "auto",
             report_formats: Sequence[str] = (), decode: str = "auto", xmore_normalizer: str = "corpus"
             ) -> dict[str, Any]:
    """``decode``: as classify's ``--decode`` (``encode_images.requested_decode``); ``xmore_normalizer``:
    X-MoRe's (``corpus``, ``set`` or ``running``, as classify's ``--xmore-normalizer``)."""
    few = [m for m in methods if m in FEWSHOT_METHODS]
    if few and fewshot is None:
        raise ValueError(f"{few} need a few-shot adapter (--adapter DIR)")
    retrieval = [m for m in methods if m in XMORE_METHODS]
    if retrieval and xmore is None:
        raise ValueError(f"{retrieval} need an image-text corpus (--corpus DIR)")
    methods = [m for m in methods if m not in FEWSHOT_METHODS + XMORE_METHODS]
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(ALL_METHODS)}")
    fp = index.fingerprint
    decode = resolve_decode(decode, index.compute_device, released=index.recipe.is_released)
    cache = EmbeddingCache(cache_path, image_embedding_key(fp.weights_sha256, decode), fp.embed_dim)
    x, labels, enc = data.embed(index, cache, batch_size=batch_size, workers=workers, threads=threads,
                                progress=progress, decode=decode)
    unread = enc.pop("unread", [])
    enc["unread"], enc["unread_first"] = len(unread), unread[:50]
    if len(x) == 0:
        first = (unread or enc["errors"] or [("", "")])[0]
        raise InputFormatError(f"no image of {data_name or 'DATA'} could be read ({enc['skipped']} unreadable"
                               + (f"; first: {first[0]}: {first[1]}" if first[0] else "") + ")")
    names = data.class_names
    report: dict[str, Any] = {"data": data_name, "index": str(index.path), "model": fp.describe(),
                              "images": int(len(x)), "classes": names, **{k: v for k, v in enc.items()},
                              "methods": [], "per_class": {}, "confused": {}, "rerank": {}, "notes": []}
    stage1_logits: np.ndarray | None = None
    if "clip" in methods or few or retrieval:
        report["prompts"] = zero_shot_weights(index, prompts, progress=progress).prompts
    for method in [m for m in methods if m not in RERANK_METHODS]:
        classifier = stage1_classifier(index, method, prompts)  # text tables load outside the timing
        t0 = time.perf_counter()
        logits = classifier(x)
        seconds = time.perf_counter() - t0
        preds = logits.argmax(axis=1)
        _record(report, method, logits, preds, labels, names, seconds)
        if method == "coder":
            stage1_logits = logits
    for method in retrieval:  # normalisers: the corpus's (each image alone), the evaluated set's, or running sums
        t0 = time.perf_counter()
        normalizer = xmore.corpus_normalizers(method) if xmore_normalizer == "corpus" else xmore_normalizer
        probs = xmore.predict(x, method, normalizer=normalizer)
        _record(report, method, probs, probs.argmax(axis=1), labels, names, time.perf_counter() - t0)
    for method in few:
        t0 = time.perf_counter()
        logits = fewshot.logits(x, method)
        _record(report, method, logits, logits.argmax(axis=1), labels, names, time.perf_counter() - t0)
    wanted_rerank = [m for m in methods if m in RERANK_METHODS]
    if wanted_rerank:
        if stage1_logits is None:
            classifier = stage1_classifier(index, "coder")
            t0 = time.perf_counter()
            stage1_logits = classifier(x)
            base_seconds = time.perf_counter() - t0
        else:
            base_seconds = next(m["seconds"] for m in report["methods"] if m["name"] == "coder")
        stage1 = stage1_logits.argmax(axis=1)
        for method in wanted_rerank:
            gap = gap_threshold if method == "coder*-gated" else None
            reranker = reranker_factory(gap) if reranker_factory else None
            if reranker is None:
                report["notes"].append(f"{method}: not evaluated, no pair texts and no LLM (--llm none)")
                continue
            t0 = time.perf_counter()
            preds = reranker(x, stage1_logits)
            seconds = base_seconds + time.perf_counter() - t0
            _record(report, method if gap is None else f"{method} (gap<{gap})", stage1_logits, preds, labels,
                    names, seconds)
            report["rerank"][report["methods"][-1]["name"]] = rerank_effect(stage1, preds, labels)
            report["notes"].append(f"{report['methods'][-1]['name']}: {reranker.summary()}")
    out_dir = Path(out_dir)
    why_not = tsne_unavailable() if tsne_samples and len(x) >= 10 else None
    if why_not:
        report["notes"].append(why_not)  # shown in report.md and printed by `eval`
    elif tsne_samples and len(x) >= 10:
        rng = np.random.default_rng(0)
        sample = rng.choice(len(x), min(tsne_samples, len(x)), replace=False)
        table = index.text_table()
        tsne_figure(x[sample], coder_features(x[sample], table.embeddings), labels[sample], names,
                    _ensure(out_dir) / "tsne.png")
        report["tsne"] = str(out_dir / "tsne.png")
    write_reports(report, out_dir)
    if "clip_benchmark" in report_formats:
        report["clip_benchmark_files"] = [p.name for p in write_clip_benchmark(report, out_dir, index.fingerprint)]
    return report


def _ensure(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _record(report: dict[str, Any], name: str, logits: np.ndarray, preds: np.ndarray, labels: np.ndarray,
            names: list[str], seconds: float) -> None:
    top1, top5 = accuracy(logits, preds, labels)
    recall = per_class_accuracy(preds, labels, names)
    report["methods"].append({"name": name, "top1": round(top1, 6), "top5": round(top5, 6),
                              "mean_per_class_recall": round(float(np.mean(list(recall.values()))), 6),
                              "seconds": round(seconds, 4),
                              "images_per_s": round(len(labels) / seconds, 1) if seconds > 0 else float("inf")})
    report["per_class"][name] = recall
    report["confused"][name] = most_confused(preds, labels, names)
