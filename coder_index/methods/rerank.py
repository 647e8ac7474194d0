"""Stage 2 of zero-shot CODER ("CODER*"): one-to-one rerank of each image's top classes
(METHODS.md §4, Eq. 9-15).

    score(a vs b) = mean(x^ · T(a,b)) - mean(x^ · T(b,a))          (0 if either side has no texts)
    final       = argmax_{c in top} sum_{j in top, j != c} score(c vs j)   (ties: stage-1 order)

Because ``mean(x^ · T) = x^ · mean(T)``, each ordered pair collapses to one difference vector
``d(a,b) = mean(T^(a,b)) - mean(T^(b,a))`` with ``d(b,a) = -d(a,b)`` exactly, so the rerank of N
images is a gather of N x top x top difference vectors and one batched dot product, chunked over
images. The released code loops per image and per pair in Python.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from coder_index.core.validation import as_float_matrix, l2_normalize
from coder_index.methods.predict import exp_blocks, top_k
from coder_index.model.compute import exact_float32, on_device
from coder_index.stores.pairs import PairTable


@dataclass
class RerankDecision:
    """What the rerank decided, per image: the ``final`` class, the stage-1 ``candidates`` it chose
    among (stage-1 order), and each candidate's ``totals`` (the summed pair scores it won), NaN for an
    image the rerank did not decide (gated out, or no pair texts among its candidates: stage 1 did)."""

    final: np.ndarray        # [N] class ids
    candidates: np.ndarray   # [N, t] class ids, stage-1 order
    totals: np.ndarray       # [N, t] float64, NaN rows: not decided by the rerank

    @property
    def decided(self) -> np.ndarray:
        return ~np.isnan(self.totals).any(axis=1)


def rerank(image_emb: Any, logits: Any, pair_texts: Mapping[tuple[int, int], Any] | PairTable, top: int = 5,
           gap_threshold: float | None = None, *, chunk: int = 1024, ties: str = "index") -> np.ndarray:
    """Final class id per image after the one-to-one rerank of its ``top`` stage-1 classes (see
    ``rerank_decisions`` for what decided it).

    ``pair_texts[(a, b)]`` are ``[K_ab, D]`` embeddings of texts describing class a as different from
    class b (or a ``PairTable`` of them, as ``TextIndex.pair_table`` gives). With ``gap_threshold``
    only images whose softmax top-1 minus top-2 probability is below it are reranked (the released
    code's gate); by default every image is.

    Runs where ``logits`` are (a tensor on a GPU: there; an array: the CPU): the pair lookup (a sorted
    key column), the gather of difference vectors, the scores, the totals and the pick all happen on
    that device; only the stage-1 top lists come to the host (to break exact ties by class id) and
    only the final class per image comes back.

    ``ties``: how exact ties of stage-1 logits are ordered, at the top-``top`` cut, among the
    candidates and for images not reranked: ``index`` (lower class id first) or ``torch``
    (``torch.topk``'s order, as the released code; the ``cvpr24`` preset).
    """
    return rerank_decisions(image_emb, logits, pair_texts, top, gap_threshold, chunk=chunk, ties=ties).final


def rerank_decisions(image_emb: Any, logits: Any, pair_texts: Mapping[tuple[int, int], Any] | PairTable,
                     top: int = 5, gap_threshold: float | None = None, *, chunk: int = 1024,
                     ties: str = "index") -> RerankDecision:
    """``rerank``, with what decided each image (``RerankDecision``): the same final classes."""
    o = _logits_tensor(logits)
    dev = o.device
    x = l2_normalize(as_float_matrix(image_emb, "image_emb"), "image_emb")
    if o.shape[0] != x.shape[0]:
        raise ValueError(f"logits has {o.shape[0]} rows but image_emb has {x.shape[0]}")
    if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 1:
        raise ValueError(f"top must be a positive integer, got {top!r}")
    if gap_threshold is not None and not np.isfinite(gap_threshold):
        raise ValueError("gap_threshold must be a finite number or None")
    n, c = o.shape
    table = pair_texts if isinstance(pair_texts, PairTable) else PairTable(pair_texts, x.shape[1], c)
    if table.n_classes != c:
        raise ValueError(f"the pair table is over {table.n_classes} classes, the logits over {c}")
    idx, _ = top_k(o, min(top, c), ties=ties)  # stage-1 order, best first
    # not reranked: the stage-1 top-1 (the released code takes it with topk(1), whose tie order can
    # differ from topk(5)'s first column)
    final = idx[:, 0].copy() if ties == "index" else top_k(o, 1, ties=ties)[0][:, 0].copy()
    todo = np.arange(n)
    if gap_threshold is not None and c > 1:
        todo = np.flatnonzero(top2_gap(o) < gap_threshold)
    t = idx.shape[1]
    totals_out = np.full((n, t), np.nan)
    if t < 2 or len(table.keys) == 0 or todo.size == 0:
        return RerankDecision(final, idx, totals_out)
    x_dev, (_, diff) = on_device(x, dev), table.on(dev)
    idx_dev = torch.from_numpy(idx).to(dev)
    ii_np, jj_np = np.triu_indices(t, k=1)  # the t(t-1)/2 unordered pairs of top positions, i < j
    ii, jj = torch.from_numpy(ii_np).to(dev), torch.from_numpy(jj_np).to(dev)
    picked = torch.empty(todo.size, dtype=torch.int64, device=dev)
    todo_dev = torch.from_numpy(todo).to(dev)
    for start in range(0, todo.size, chunk):
        rows = todo_dev[start:start + chunk]
        cand = idx_dev[rows]                              # [n, t]
        pos, sign, valid = table.lookup_on(cand[:, ii], cand[:, jj])
        # s = score(c_i vs c_j); score(c_j vs c_i) = -s exactly
        with exact_float32():
            dots = torch.einsum("nd,npd->np", x_dev[rows], diff[pos])
        s = torch.where(valid, dots * sign, torch.zeros((), dtype=dots.dtype, device=dev)).double()
        pair_scores = torch.zeros((len(rows), t, t), dtype=torch.float64, device=dev)
        pair_scores[:, ii, jj] = s
        pair_scores[:, jj, ii] = -s
        totals = pair_scores.sum(dim=2)
        best = _first_argmax(totals)                     # first max = stage-1 order
        picked[start:start + len(rows)] = cand.gather(1, best[:, None])[:, 0]
        # an image none of whose candidate pairs has texts was not decided by the rerank (all ties)
        evidence = valid.any(dim=1).cpu().numpy()
        block = totals.cpu().numpy()
        block[~evidence] = np.nan
        totals_out[todo[start:start + len(rows)]] = block
    final[todo] = picked.cpu().numpy()
    return RerankDecision(final, idx, totals_out)


def _first_argmax(totals: torch.Tensor) -> torch.Tensor:
    """The first column holding each row's maximum (numpy's argmax rule; torch's is unspecified on
    ties on some devices)."""
    is_max = totals == totals.amax(dim=1, keepdim=True)
    cols = torch.arange(totals.shape[1], device=totals.device).expand_as(totals)
    return torch.where(is_max, cols, totals.shape[1]).amin(dim=1)


def top2_gap(logits: torch.Tensor, block_bytes: int | None = None) -> np.ndarray:
    """Softmax (float64) top-1 minus top-2 probability per row, a block of rows at a time."""
    out = []
    for _, z in exp_blocks(logits, block_bytes):
        z /= z.sum(dim=1, keepdim=True)
        best2 = torch.topk(z, 2, dim=1).values
        out.append((best2[:, 0] - best2[:, 1]).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def _logits_tensor(logits: Any) -> torch.Tensor:
    """Checked float32 logits as a tensor where they are (a GPU tensor stays there)."""
    if isinstance(logits, torch.Tensor) and logits.device.type != "cpu":
        if logits.ndim != 2 or 0 in logits.shape:
            raise ValueError(f"logits must be a non-empty 2-D array, got shape {tuple(logits.shape)}")
        o = logits.detach().float()
        if not bool(torch.isfinite(o).all()):
            raise ValueError("logits holds NaN or infinite values")
        return o
    return torch.from_numpy(as_float_matrix(logits, "logits"))
