"""The loaded index and method behind the server: the same scorer and explanation as the CLI's.

``classify`` rows are built exactly as ``pipeline.classify`` writes them (path, label, score,
method, top_k), ``explain`` is ``methods.explain.explain``, ``texts`` is ``TextIndex.texts_near``, ``info``
is ``TextIndex.info`` plus the server's settings: a response equals the CLI's output for the same
inputs.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from coder_index.core.presets import resolve_gap_threshold
from coder_index.core.redaction import redact
from coder_index.methods.scorer_spec import ScorerSpec, build_scorer
from coder_index.pipeline.classify import prediction_rows
from coder_index.serve.config import ServeConfig
from coder_index.serve.worker import Job, ModelWorker


class ModelService:
    def __init__(self, config: ServeConfig, note: Any = None) -> None:
        from coder_index.methods.text_index import TextIndex

        self.config = config
        self.index = TextIndex.open(config.index, device=config.device)
        self.index.require_model(config.model, config.pretrained)
        self.names = self.index.class_names()
        self.top_k = min(config.top_k, len(self.names))
        gap = resolve_gap_threshold(config.gap_threshold, self.index.recipe)
        self.spec = ScorerSpec(top_k=self.top_k, method=config.method, rerank=config.rerank, gap_threshold=gap,
                               adapter=None if config.adapter is None else str(config.adapter),
                               corpus=None if config.corpus is None else str(config.corpus),
                               retrieve_k=config.retrieve_k, normalizer=config.xmore_normalizer,
                               retrieval=config.xmore_retrieval)
        self.scorer = build_scorer(self.index, self.spec, note=note)  # no LLM: the rerank uses stored pairs
        self.method = self.scorer.method
        # explanations explain this method's prediction, with at least the top 5 and a runner-up
        explain_top = min(max(5, self.top_k), len(self.names))
        self.explain_scorer = self.scorer if explain_top == self.top_k else \
            build_scorer(self.index, replace(self.spec, top_k=explain_top))
        self.preprocess = self.index.encoder.preprocess
        self.worker = ModelWorker(self.index.encoder.encode_image_batch, max_batch=config.max_batch)
        self._rowwise = self._score_rows  # one object: concurrent requests' rows are scored together
        self._run_scorers: dict[tuple[str, str], Any] = {}

    def close(self) -> None:
        self.worker.close()

    # ------------------------------------------------------------------ API
    def classify(self, pixels: torch.Tensor, paths: list[str]) -> Future:
        """Rows for the images, in order. An image's answer is its own (concurrent requests' images are
        scored together); with X-MoRe over a set or running sums (``--xmore-normalizer set|running``),
        over this request's images, as a folder holding just them would give."""
        if not self.scorer.alone:
            return self.worker.submit(Job(pixels=pixels, finish=lambda emb: self._rows(paths, *self._alone(emb))))
        fut: Future = Future()
        inner = self.worker.submit(Job(pixels=pixels, rowwise=self._rowwise))
        inner.add_done_callback(lambda f: _chain(f, fut, lambda scored: self._rows(paths, *_stack(scored))))
        # (per row: ids, scores and, for CODER*, stage 1's first class and probability)
        return fut

    def explain(self, pixels: torch.Tensor, paths: list[str], k: int, record: Any = None) -> Future:
        """Explanations of the images by this server's method; with ``record`` (the run record of a
        predictions file's rows), by the method, settings and normalisers that made those rows."""
        from coder_index.methods.explain import explain

        scorer = self._run_scorer(record) if record is not None else self.explain_scorer

        def finish(emb: np.ndarray) -> list[dict[str, Any]]:
            if not scorer.alone and scorer is self.explain_scorer:  # X-MoRe over a set: this request's images
                scorer.reset()
                if scorer.two_pass:
                    scorer.prepare(emb, {})
            results = explain(self.index, emb, k, scorer=scorer)
            for path, r in zip(paths, results, strict=True):
                r["path"] = path
            return results

        return self.worker.submit(Job(pixels=pixels, finish=finish))

    def _run_scorer(self, record: Any) -> Any:
        """The scorer that made a run's rows (``pipeline.rows.run_scorer``), built once per run record;
        the server's own when the record cannot give it (rows of another index: said at start)."""
        from coder_index.core.errors import CoderIndexError
        from coder_index.pipeline.rows import run_scorer

        key = (str(record.out), repr(record.provenance))
        if key not in self._run_scorers:
            try:
                explain_top = min(max(5, self.top_k), len(self.names))
                self._run_scorers[key] = run_scorer(self.index, record, top_k=explain_top)
            except (CoderIndexError, ValueError):
                self._run_scorers[key] = self.explain_scorer
        return self._run_scorers[key]

    def texts(self, query: str, k: int) -> Future:
        return self.worker.submit(Job(call=lambda: self.index.texts_near(query, k)))

    def info(self) -> dict[str, Any]:
        data = redact(self.index.info())
        data["server"] = {"method": self.method, "top_k": self.top_k, "explain_k": self.config.explain_k,
                          "rerank_pairs": self.index.counts()["pair_texts"] if self.config.rerank else None,
                          "limits": {"max_file_bytes": self.config.max_file_bytes,
                                     "max_files": self.config.max_files, "max_pixels": self.config.max_pixels},
                          "device": str(self.index.compute_device),
                          "predictions": self.config.predictions is not None,
                          "report": self.config.report is not None,
                          "batches": self.worker.batches, "images": self.worker.images}
        return data

    # ------------------------------------------------------------------ scoring
    def _score_rows(self, emb: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, Any]]:
        scored = self.scorer(emb)
        ids, scores = scored
        stage1 = getattr(scored, "stage1", None)
        firsts = list(zip(*stage1, strict=True)) if stage1 is not None else [None] * len(ids)
        return list(zip(ids, scores, firsts, strict=True))

    def _alone(self, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A request's images scored as a run of their own (X-MoRe over a set, or running sums)."""
        self.scorer.reset()
        if self.scorer.two_pass:
            self.scorer.prepare(emb, {})
        return self.scorer(emb)

    def _rows(self, paths: list[str], ids: np.ndarray, scores: np.ndarray, stage1: Any = None
              ) -> list[dict[str, Any]]:
        return prediction_rows(paths, ids, scores, self.names, self.method, stage1)


def _stack(scored: list[tuple[np.ndarray, np.ndarray, Any]]) -> tuple[np.ndarray, np.ndarray, Any]:
    stage1 = None
    if scored and all(f is not None for _, _, f in scored):
        stage1 = (np.array([f[0] for _, _, f in scored]), np.array([f[1] for _, _, f in scored]))
    return np.stack([i for i, _, _ in scored]), np.stack([s for _, s, _ in scored]), stage1


def _chain(done: Future, out: Future, then: Any) -> None:
    exc = done.exception()
    if exc is not None:
        out.set_exception(exc)
        return
    try:
        out.set_result(then(done.result()))
    except Exception as err:
        out.set_exception(err)
