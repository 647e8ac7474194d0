"""Stage 1 for vocabularies too large for a dense CODER: candidate classes first, then exact scores.

A dense CODER costs K x D multiply-adds per image (a million texts: half a GFLOP). Most classes are
nowhere near a given image, so ``CandidateClassifier`` first searches one *class vector* per class
(C x D, exact inner product) for the ``m`` most likely classes, then computes the stage-1 logit of those classes
exactly, from their own texts, with the same reductions as ``CoderClassifier``.

The class vector is chosen so that its inner product with an image bounds the stage-1 logit from
below and is usually close to it. With n_x name/synonym texts and n_e attribute/analogous texts,

    logit_c / 100 = (max_name(x . w) + sum_extra(x . w)) / (n_e + 1)
                 >= (mean_name(x . w) + sum_extra(x . w)) / (n_e + 1) = x . v_c,
    v_c = (mean of the name vectors + sum of the extra vectors) / (n_e + 1),

equal when a class has one name text. The exact logit of a candidate needs the max over its name
texts (gathered) and the sum over its extra texts, which is x . (the sum of their vectors): one
stored row per class, so scoring m candidates reads a few rows per candidate, not all its texts. (The
sum is the same number as the dense path's, up to float32 rounding of a different summation order.)

A class outside the candidates can only win where the max
over its names beats their mean by more than the margin to the best candidate, which is rare at m = 64
(``benchmarks/bench_scale.py`` measures the agreement with the dense result).

Scores are the softmax over the candidate classes; every other class gets probability 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from coder_index.core.linalg import as_tensor
from coder_index.methods.coder import DEFAULT_CHUNK_BYTES, LOGIT_SCALE, CoderClassifier, TextLayout, image_matrix
from coder_index.model.compute import exact_float32, on_device

# Vocabulary sizes above which the dense CODER gets slow enough to suggest --candidates.
DENSE_TEXT_LIMIT = 200_000
DENSE_CLASS_LIMIT = 20_000
DEFAULT_CANDIDATES = 64


def suggest_candidates(n_texts: int, n_classes: int) -> bool:
    """True for vocabularies where candidate search is worth it (see the limits above)."""
    return n_texts > DENSE_TEXT_LIMIT or n_classes > DENSE_CLASS_LIMIT


class CandidateClassifier:
    """Stage-1 logits restricted to each image's ``m`` candidate classes.

    ``logits`` returns the dense ``[N, C]`` shape of ``CoderClassifier.logits`` with ``-inf`` outside
    the candidates (so softmax, top-k and the rerank work unchanged); ``candidate_logits`` returns the
    compact ``(class ids [N, m], logits [N, m])``.
    """

    def __init__(self, classifier: CoderClassifier, m: int = DEFAULT_CANDIDATES,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES // 4) -> None:
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
            raise ValueError(f"the number of candidates must be a positive integer, got {m!r}")
        self.base = classifier
        self.layout: TextLayout = classifier.layout
        self.n_classes = self.layout.n_classes
        self.m = int(min(m, self.n_classes))
        self.chunk_bytes = chunk_bytes
        lay = self.layout
        self._name_counts = np.diff(np.append(lay.name_starts, lay.n_name)).astype(np.int64)
        self._denom = (lay.extra_counts + 1).astype(np.float32)
        self.class_vectors, extra_sums = self._class_sums()
        # everything a search touches lives on the classifier's device (the CPU or a GPU)
        self.device = dev = classifier.device
        self._class_vectors = torch.from_numpy(self.class_vectors).to(dev)
        self._extra_sums = torch.from_numpy(extra_sums).to(dev)
        self._denom_t = torch.from_numpy(self._denom).to(dev)
        self._name_table = torch.from_numpy(_name_table(lay.name_starts, self._name_counts)).to(dev)
        self._texts = classifier._w

    @property
    def dim(self) -> int:
        return self.base.dim

    def _class_sums(self) -> tuple[np.ndarray, np.ndarray]:
        """(v_c, the sum of each class's extra vectors): the name means from one pass over the name rows
        of the sorted text matrix in blocks (read, never copied whole), the extra sums the classifier's
        own: two C x D float32 arrays."""
        w = self.base.text_emb
        name_cls, _, _ = self.layout._segments
        n_name = self.layout.n_name
        names = torch.zeros((self.n_classes, w.shape[1]), dtype=torch.float32)
        block = max(1, (64 << 20) // (4 * w.shape[1]))
        for s in range(0, n_name, block):
            rows = as_tensor(w[s:min(s + block, n_name)])
            names.index_add_(0, name_cls[s:s + len(rows)], rows)
        extras = self.base._extra_sums.cpu()
        names /= torch.from_numpy(self._name_counts.astype(np.float32))[:, None]
        names += extras
        names /= torch.from_numpy(self._denom)[:, None]
        return names.numpy(), extras.numpy()

    def candidates(self, x: np.ndarray) -> np.ndarray:
        """``[N, m]`` class ids, best class vector first: an exact inner-product search, as a chunked
        GEMM + top-k in torch (about 3x faster here than ``faiss.knn`` on the same arrays)."""
        xt = on_device(np.ascontiguousarray(x, dtype=np.float32), self.device)
        out = np.empty((len(x), self.m), np.int64)
        step = max(1, self.chunk_bytes // (4 * self.n_classes))
        with exact_float32():
            for s in range(0, len(x), step):
                best = torch.topk(xt[s:s + step] @ self._class_vectors.T, self.m, dim=1).indices
                out[s:s + step] = best.cpu().numpy()
        return out

    def candidate_logits(self, image_emb: Any, *, normalized: bool = False) -> tuple[np.ndarray, np.ndarray]:
        x = image_matrix(image_emb, self.dim, normalized)
        cand = self.candidates(x)
        out = np.empty(cand.shape, np.float32)
        # images per step such that the gathered rows stay within chunk_bytes
        step = max(1, self.chunk_bytes // (4 * self.dim * self.m * (self._name_table.shape[1] + 1)))
        for s in range(0, len(x), step):
            out[s:s + step] = self._exact(x[s:s + step], cand[s:s + step])
        return cand, out

    def _exact(self, x: np.ndarray, cand: np.ndarray) -> np.ndarray:
        """Stage-1 logits of each image's candidates from their texts: the max over the name texts
        (gathered) plus the sum over the extra texts, which is x . (their sum): one gathered row per
        candidate instead of one per text. torch's index_select + bmm, far faster than numpy's
        fancy indexing for these gathers."""
        n, m = cand.shape
        xt = on_device(np.ascontiguousarray(x), self.device)[:, :, None]               # [n, D, 1]
        c = torch.from_numpy(cand.astype(np.int64)).to(self.device)
        idx = self._name_table[c].reshape(-1)                                         # [n * m * L]
        with exact_float32():
            names = self._texts.index_select(0, idx).view(n, -1, self.dim)
            total = torch.bmm(names, xt).view(n, m, -1).amax(dim=2)
            extras = self._extra_sums.index_select(0, c.reshape(-1)).view(n, m, self.dim)
            total += torch.bmm(extras, xt).view(n, m)
        total.mul_(LOGIT_SCALE / self._denom_t[c])
        return total.cpu().numpy()

    def logits(self, image_emb: Any, *, normalized: bool = False) -> np.ndarray:
        cand, vals = self.candidate_logits(image_emb, normalized=normalized)
        out = np.full((len(cand), self.n_classes), -np.inf, np.float32)
        np.put_along_axis(out, cand, vals, axis=1)
        return out


def _name_table(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``[C, L]`` sorted-column ids of each class's name texts, L the most any class has; shorter
    rows repeat their class's first name, which leaves the max over them unchanged."""
    width = int(counts.max())
    j = np.arange(width)[None, :]
    return (starts[:, None] + np.where(j < counts[:, None], j, 0)).astype(np.int64)
