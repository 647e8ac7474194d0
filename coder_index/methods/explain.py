"""Explanations: why an image gets its class, from the texts, the rerank's pairs and the corpus
captions that the method itself used (``explain``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from coder_index.core.linalg import matmul_t
from coder_index.methods.pair_evidence import TOP, pair_evidence
from coder_index.methods.predict import coder_classifier, top_k
from coder_index.methods.scorers import CoderScorer

if TYPE_CHECKING:
    from coder_index.stores.text_index import TextStore


def explain(index: TextStore, image_emb: np.ndarray, k: int = 10, n_classes: int = 5,
            scorer: Any = None) -> list[dict[str, Any]]:
    """Per image, the prediction that ``scorer`` makes (the method's own: CODER by default, CODER*,
    a CODER-Adapter or X-MoRe, as ``build_scorer`` builds them for classify and serve) and why:
    ``method``; the top classes with the method's scores (``score``, as in the predictions file)
    and each class's CODER stage-1 logit (``logit``: what the texts say); the k nearest texts
    overall; the best texts of the predicted class and of the runner-up; for X-MoRe the captions of
    the nearest corpus images (``captions``); and, when the index holds one-to-one pair texts for the
    stage-1 top classes, what the CODER* rerank saw (``pair_evidence``: pair scores, totals, its
    pick), else ``"pairs": null``. X-MoRe's normalisers are those of ``scorer`` (``prepare``d by the
    caller: over the explained images, as a folder holding just them would give)."""

    names = index.class_names()
    coder_logits = coder_classifier(index).logits(image_emb)
    stage1, _ = top_k(coder_logits, max(n_classes, TOP))
    # the rerank's own top-5 (exact ties at the cut in torch.topk's order under cvpr24): its pairs are shown
    rerank_top = stage1 if not index.recipe.is_released else top_k(coder_logits, TOP, ties="torch")[0]
    if scorer is None:
        scorer = CoderScorer(index, max(n_classes, 2))
    cls_idx, cls_score = scorer(image_emb)
    cos, ids = index.search_texts(image_emb, k)
    table = index.text_table()
    sims = matmul_t(image_emb, table.embeddings)  # only the explained images: small N
    meta = index.texts_by_id({int(i) for i in ids.ravel() if i >= 0})
    evidence = pair_evidence(index, image_emb, rerank_top, names)
    captions = _corpus_captions(scorer, image_emb, k)
    n_show = min(n_classes, cls_idx.shape[1])
    out = []
    for n in range(len(image_emb)):
        best = int(cls_idx[n, 0])
        second = int(cls_idx[n, 1]) if cls_idx.shape[1] > 1 else None
        item = {
            "prediction": names[best],
            "method": scorer.method,
            "classes": [{"class": names[c], "score": float(p), "logit": float(coder_logits[n, c])}
                        for c, p in zip(cls_idx[n, :n_show], cls_score[n, :n_show], strict=True)],
            "nearest_texts": [_hit(meta[int(i)], float(c)) for c, i in zip(cos[n], ids[n], strict=True) if i >= 0],
            "class_texts": _class_texts(index, table, sims[n], best, k),
            "runner_up": None if second is None else names[second],
            "runner_up_texts": [] if second is None else _class_texts(index, table, sims[n], second, k),
            "pairs": evidence[n],
        }
        if captions is not None:
            item["captions"] = captions[n]
        out.append(item)
    return out


def _corpus_captions(scorer: Any, image_emb: np.ndarray, k: int) -> list[list[dict[str, Any]]] | None:
    """X-MoRe's evidence: the captions of the k corpus images nearest each image, nearest first."""
    xmore = getattr(scorer, "xmore", None)
    if xmore is None:
        return None
    cos, ids = xmore.corpus.search(image_emb, k)
    rows = xmore.corpus.rows(sorted({int(i) for i in ids.ravel() if i >= 0}))
    return [[{**rows.get(int(i), {}), "cosine": round(float(c), 6)} for c, i in zip(cr, ir, strict=True) if i >= 0]
            for cr, ir in zip(cos, ids, strict=True)]


def _class_texts(index: TextStore, table: Any, sims: np.ndarray, class_id: int, k: int) -> list[dict[str, Any]]:
    """The k texts of one class nearest the image, best first."""
    own = np.flatnonzero(table.class_ids == class_id)
    own = own[np.argsort(-sims[own], kind="stable")[:k]]
    own_meta = index.texts_by_id(table.ids[own])
    return [_hit(own_meta[int(table.ids[j])], float(sims[j])) for j in own]


def _hit(row: dict[str, Any], cosine: float) -> dict[str, Any]:
    return {"text": row["text"], "class": row["class"], "kind": row["kind"], "cosine": round(cosine, 6)}
