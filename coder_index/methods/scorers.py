"""Scorers: turn a chunk of image embeddings into ranked classes. One folder runner, many scorers.

* ``CoderScorer``: CODER stage-1 logits, or any logits function (a few-shot adapter), optionally
  followed by the one-to-one rerank (CODER*);
* ``XMoreScorer``: X-MoRe (``xmore`` / ``coder+xmore``), whose confidence normalisers belong to the
  corpus by default (an image's answer depends on that image alone); over the whole run (``set``:
  every embedding first, ``two_pass``) or the released running sums on request.

Each scorer says what identifies its predictions (``provenance``), which the runner records with the
output so that a resumed run never mixes rows of different settings.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from coder_index.core.choices import XMORE_NORMALIZERS
from coder_index.methods.predict import coder_classifier, softmax, softmax_top_k, top_k

if TYPE_CHECKING:
    from coder_index.stores.text_index import TextStore


class Scored(tuple):
    """A scorer's rows: ``(ids, scores)``, best first (it unpacks as that pair), and for CODER* rows
    ``stage1``: the class CODER's stage 1 ranked first and its probability, per row (what the rerank
    started from, shown beside what decided)."""

    stage1: tuple[np.ndarray, np.ndarray] | None

    def __new__(cls, ids: np.ndarray, scores: np.ndarray, stage1: tuple[np.ndarray, np.ndarray] | None = None
                ) -> Scored:
        self = super().__new__(cls, (ids, scores))
        self.stage1 = stage1
        return self


RERANK_SCALE = 100.0  # the rerank's totals (summed differences of cosines) as logits, CLIP's scale


def rerank_rows(ids: np.ndarray, probs: np.ndarray, decision: Any) -> tuple[np.ndarray, np.ndarray]:
    """Rows ordered and scored by what decided them. An image the rerank decided: its candidates by
    the rerank's probability (softmax of ``RERANK_SCALE`` x each candidate's summed pair scores; the
    final class first, ties in stage-1 order), then any further class at 0. Others (gated out, or no
    pair texts): stage 1's order and probabilities, the final class first."""
    order = _rerank_order(ids, decision.final)
    ids, probs = np.take_along_axis(ids, order, axis=1), np.take_along_axis(probs, order, axis=1).copy()
    dec = np.flatnonzero(decision.decided)
    if dec.size == 0:
        return ids, probs
    cand = decision.candidates[dec]
    z = RERANK_SCALE * decision.totals[dec]
    z = np.exp(z - z.max(axis=1, keepdims=True))
    r = z / z.sum(axis=1, keepdims=True)
    by = np.argsort(-r, axis=1, kind="stable")  # the final class is the first maximum: first here too
    cand, r = np.take_along_axis(cand, by, axis=1), np.take_along_axis(r, by, axis=1)
    rows = ids[dec]
    outside = ~(rows[:, :, None] == cand[:, None, :]).any(axis=2)        # the row's classes past the candidates
    t, k = cand.shape[1], rows.shape[1]
    if k < t or not bool((outside.sum(axis=1) == k - t).all()):
        return ids, probs  # an exact tie put a candidate past the row's classes: stage 1's rows, final first
    ids[dec] = np.concatenate([cand, rows[outside].reshape(len(dec), k - t)], axis=1)
    probs[dec] = np.concatenate([r, np.zeros((len(dec), k - t))], axis=1)
    return ids, probs


class CoderScorer:
    """Stage-1 logits (CODER by default, or ``logits``), softmax, top-k; with ``reranker``, the
    rerank's choice is placed first (``chunk`` images at a time, so that the pair texts missing for
    a whole chunk are generated together). With ``candidates`` (a ``CandidateClassifier``), stage 1
    scores each image's candidate classes only, and the softmax is over them."""

    two_pass = False
    alone = True  # an image's answer depends on that image alone

    def reset(self) -> None:
        """Nothing is carried from one batch to the next."""

    def __init__(self, index: TextStore, top_k: int, *, reranker: Callable[[np.ndarray, np.ndarray], np.ndarray]
                 | None = None, logits: Callable[[np.ndarray], np.ndarray] | None = None, method: str | None = None,
                 settings: dict[str, Any] | None = None, rerank_chunk: int = 2048, candidates: Any = None) -> None:
        self.index = index
        self.top_k = top_k
        self.reranker = reranker
        self.candidates = candidates
        # CODER logits stay on the index's device (a GPU's too): only the top k come back
        self.logits = logits or (lambda x: coder_classifier(index).logits_on_device(x, normalized=True))
        self.method = method or ("coder*" if reranker is not None else "coder")
        self.settings = settings or {}
        self.chunk = rerank_chunk if reranker is not None else 1

    def provenance(self) -> dict[str, Any]:
        return {"method": self.method, **self.settings}

    def __call__(self, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.candidates is not None:
            return self._with_candidates(emb)
        logits = self.logits(emb)
        ids, probs = softmax_top_k(logits, max(self.top_k, 5 if self.reranker else 1))
        if self.reranker is None:
            return Scored(ids[:, : self.top_k], probs[:, : self.top_k])
        stage1 = (ids[:, 0].copy(), probs[:, 0].copy())
        decide = getattr(self.reranker, "decide", None)
        if decide is not None:  # the rows follow what decided them (rerank_rows)
            ids, probs = rerank_rows(ids, probs, decide(emb, logits))
        else:  # a plain function of (emb, logits) -> final classes: its class first, stage-1 scores
            order = _rerank_order(ids, self.reranker(emb, logits))
            ids, probs = np.take_along_axis(ids, order, axis=1), np.take_along_axis(probs, order, axis=1)
        return Scored(ids[:, : self.top_k], probs[:, : self.top_k], stage1)

    def _with_candidates(self, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cand, vals = self.candidates.candidate_logits(emb, normalized=True)
        probs = softmax(vals.astype(np.float64))
        pos, _ = top_k(probs, max(self.top_k, 5 if self.reranker else 1))
        ids = np.take_along_axis(cand, pos, axis=1)
        probs = np.take_along_axis(probs, pos, axis=1)
        if self.reranker is None:
            return Scored(ids[:, : self.top_k], probs[:, : self.top_k])
        stage1 = (ids[:, 0].copy(), probs[:, 0].copy())
        decide = getattr(self.reranker, "decide", None)
        # the rerank reads [n, C] logits: build them (-inf outside the candidates) a few rows at a time
        n_classes = self.candidates.n_classes
        rows = max(1, (64 << 20) // (4 * n_classes))
        for s in range(0, len(emb), rows):
            e = s + rows
            dense = np.full((len(cand[s:e]), n_classes), -np.inf, np.float32)
            np.put_along_axis(dense, cand[s:e], vals[s:e], axis=1)
            if decide is not None:  # the rows follow what decided them, as without --candidates
                ids[s:e], probs[s:e] = rerank_rows(ids[s:e], probs[s:e], decide(emb[s:e], dense))
            else:
                order = _rerank_order(ids[s:e], self.reranker(emb[s:e], dense))
                ids[s:e] = np.take_along_axis(ids[s:e], order, axis=1)
                probs[s:e] = np.take_along_axis(probs[s:e], order, axis=1)
        return Scored(ids[:, : self.top_k], probs[:, : self.top_k], stage1)


def _rerank_order(ids: np.ndarray, final: np.ndarray) -> np.ndarray:
    """Positions that put the rerank's class first (always one of the stage-1 top 5, hence in ids),
    then the others in stage-1 order."""
    return np.argsort(ids != final[:, None], axis=1, kind="stable")


class XMoreScorer:
    """X-MoRe. ``normalizer`` (METHODS.md §6, how each modality's confidence is scaled):

    * ``corpus`` (the default): the mean confidences over a fixed sample of the corpus's own images
      (``XMore.corpus_normalizers``), so an image's probabilities depend on that image alone;
    * ``set``: the means over every image of the run (the evaluated set): every embedding is needed
      first (``two_pass``) and a resumed run reuses the normalisers saved with its record;
    * ``running``: the released code's running sums over the images in the order they are scored
      (``--preset cvpr24``'s, for reproducing its numbers; order-dependent by design).
    """

    chunk = 4096

    def __init__(self, xmore: Any, method: str, top_k: int, normalizer: str = "corpus") -> None:
        if normalizer not in XMORE_NORMALIZERS:
            raise ValueError(f"the X-MoRe normalizer must be one of {', '.join(XMORE_NORMALIZERS)}, got {normalizer!r}")
        self.xmore, self.method, self.top_k, self.normalizer = xmore, method, top_k, normalizer
        self.two_pass = normalizer == "set"
        self.normalizers: tuple[float, float] | None = None
        self._running = (0.0, 0.0)  # the running sums of both confidences, over the images scored so far

    def provenance(self) -> dict[str, Any]:
        corpus = self.xmore.corpus
        where = corpus.manifest["url"] if corpus.manifest.get("kind") == "service" else str(corpus.path.resolve())
        out = {"method": self.method, "corpus": {"path": where,
                                                 "created_at": corpus.manifest.get("created_at"),
                                                 "rows": corpus.manifest.get("rows")},
               "retrieve_k": self.xmore.k}
        if self.xmore.retrieval != "nearest":  # (runs recorded before the choice retrieved the nearest)
            out["retrieval"] = self.xmore.retrieval
        if getattr(corpus, "manifest", {}).get("kind") == "reference":  # what it refers to, as checked
            out["corpus"]["refers_to"] = corpus.manifest["embeddings"].get("sample_sha256")
        if self.normalizer != "set":  # (a run recorded before 0.5 normalised over its set: it resumes so)
            out["normalizer"] = self.normalizer
        if self.normalizer == "corpus":  # a rebuilt corpus, other texts: another normaliser, another run
            out["normalizers"] = [round(v, 12) for v in self.corpus_normalizers()]
        return out

    @property
    def alone(self) -> bool:
        """Whether an image's answer depends on that image alone (else on the others scored with it)."""
        return self.normalizer == "corpus"

    def reset(self) -> None:
        """Forget what the images scored before left (a new set, new running sums)."""
        self._running = (0.0, 0.0)
        if self.normalizer == "set":
            self.normalizers = None

    def corpus_normalizers(self) -> tuple[float, float]:
        if self.normalizers is None:
            self.normalizers = self.xmore.corpus_normalizers(self.method)
        return self.normalizers

    def prepare(self, all_emb: np.ndarray, state: dict[str, Any]) -> dict[str, Any]:
        """``set``: the normalisers from the state of a resumed run, else from every embedding of this one."""
        if self.normalizer != "set":
            return {}
        if "normalizers" in state:
            self.normalizers = tuple(state["normalizers"])
            return {}
        self.normalizers = self.xmore.normalizers(all_emb, self.method)
        return {"normalizers": list(self.normalizers), "normalizer_images": int(len(all_emb))}

    def probabilities(self, emb: np.ndarray) -> np.ndarray:
        """[N, C] probabilities of the ensemble, each row scaled to sum to 1 (the ranking is unchanged)."""
        from coder_index.methods.xmore.ensemble import combine, running_weights
        from coder_index.methods.xmore.predict import IMAGE_MODALITIES

        p_img, p_cap = self.xmore.modality_probs(emb, IMAGE_MODALITIES[self.method])
        if self.normalizer == "running":
            probs, self._running = running_weights(p_img, p_cap, self._running)
        else:
            normalizers = self.corpus_normalizers() if self.normalizer == "corpus" else self.normalizers
            assert normalizers is not None, "prepare() first"
            probs = combine(p_img, p_cap, normalizers)
        # The ensemble weighs two distributions by confidence, so a row does not sum to 1; scaled to
        # sum to 1 (the ranking is unchanged) the scores are probabilities again.
        return probs / probs.sum(axis=1, keepdims=True)

    def __call__(self, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return top_k(self.probabilities(emb), self.top_k)
