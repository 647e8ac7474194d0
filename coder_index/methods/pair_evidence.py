"""What the one-to-one rerank (CODER*, METHODS.md §4) saw for one image: the score of every pair of
its top classes, each class's total, the class the rerank picks, and the pair texts nearest the
image on either side of each pair. For explanations (``methods.explain``); the rerank itself is
``rerank.rerank``, and the scores here are computed the same way (``PairTable``), so they agree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from coder_index.core.validation import l2_normalize
from coder_index.stores import pairs as pair_store

if TYPE_CHECKING:
    from coder_index.stores.text_index import TextStore

TOP = 5  # the rerank's top list (released code: top-5)


def pair_evidence(index: TextStore, image_emb: np.ndarray, top_ids: np.ndarray, names: list[str],
                  texts_per_side: int = 3) -> list[dict[str, Any] | None]:
    """Per image (rows of ``image_emb``, stage-1 classes ``top_ids`` best first): None when no pair
    of its top classes has texts in the index, else ``{"classes", "pairs", "totals", "prediction",
    "changed"}``. ``pairs`` lists every unordered pair ``a`` (higher stage-1) vs ``b`` with its score
    (mean cosine to texts "a differs from b" minus mean cosine to "b differs from a"; 0 without texts
    on both sides) and the nearest texts on each side."""
    x = l2_normalize(np.asarray(image_emb, np.float32), "image_emb")
    top = np.asarray(top_ids, np.int64)[:, :TOP]
    t = top.shape[1]
    if t < 2:
        return [None] * len(x)
    ii, jj = np.triu_indices(t, k=1)
    wanted = {(int(r[i]), int(r[j])) for r in top for i in range(t) for j in range(t) if i != j}
    table = pair_store.pair_table(index, wanted)
    if not len(table.keys):
        return [None] * len(x)
    a, b = top[:, ii], top[:, jj]
    pos, sign, valid = table.lookup(a, b)
    scores = np.einsum("nd,npd->np", x, table.diff[pos]) * sign if len(table.keys) else np.zeros(a.shape)
    scores = np.where(valid, scores, 0.0)
    full = np.zeros((len(x), t, t))
    full[:, ii, jj] = scores
    full[:, jj, ii] = -scores
    totals = full.sum(axis=2)
    final = top[np.arange(len(x)), totals.argmax(axis=1)]  # first max = stage-1 order, as the rerank
    from coder_index.stores.pairs import pair_text_rows

    texts = pair_text_rows(index, wanted)
    out: list[dict[str, Any] | None] = []
    for n in range(len(x)):
        if not valid[n].any():
            out.append(None)
            continue
        pairs = [{"a": names[a[n, p]], "b": names[b[n, p]], "score": round(float(scores[n, p]), 6),
                  "has_texts": bool(valid[n, p]),
                  "a_over_b": _nearest(texts.get((int(a[n, p]), int(b[n, p]))), x[n], texts_per_side),
                  "b_over_a": _nearest(texts.get((int(b[n, p]), int(a[n, p]))), x[n], texts_per_side)}
                 for p in range(len(ii))]
        out.append({"classes": [names[c] for c in top[n]],
                    "totals": [round(float(v), 6) for v in totals[n]],
                    "pairs": pairs, "prediction": names[final[n]], "changed": bool(final[n] != top[n, 0])})
    return out


def _nearest(rows: tuple[list[dict[str, Any]], np.ndarray] | None, x: np.ndarray, k: int) -> list[dict[str, Any]]:
    if rows is None:
        return []
    meta, vectors = rows
    cos = l2_normalize(np.asarray(vectors, np.float32), "pair_texts") @ x
    best = np.argsort(-cos, kind="stable")[:k]
    return [{**meta[i], "cosine": round(float(cos[i]), 6)} for i in best]
