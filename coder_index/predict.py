"""Zero-shot prediction and explanation on top of a ``TextIndex`` (METHODS.md §3)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .coder import CoderClassifier
from .compute import block_budget
from .linalg import matmul_t
from .pipeline.decode import load_image

if TYPE_CHECKING:
    from .index.text_index import TextIndex

GENERAL_KINDS = ("name", "attribute", "analogous", "synonym")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def softmax_top_k(logits: np.ndarray | torch.Tensor, k: int,
                  block_bytes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``top_k(softmax(logits in float64), k)`` without the ``[N, C]`` float64 probabilities, on the
    logits' device (an array: the CPU): classes are chosen on the logits (softmax keeps their order
    and their ties), each row's normaliser is taken a block of rows at a time, and only the k chosen
    columns per row come back to the host."""
    t = _as_scores(logits)
    ids, _ = top_k(t, k)
    ids_t = torch.from_numpy(ids).to(t.device)
    probs = torch.empty(ids.shape, dtype=torch.float64, device=t.device)
    for s, z in exp_blocks(t, block_bytes):
        probs[s:s + len(z)] = z.gather(1, ids_t[s:s + len(z)]) / z.sum(dim=1, keepdim=True)
    return ids, probs.cpu().numpy()


def exp_blocks(logits: torch.Tensor, block_bytes: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, ``exp(row - row max)`` in float64) a block of rows at a time, on the logits'
    device: the unnormalised softmax, without an ``[N, C]`` float64 array."""
    budget = block_bytes or block_budget(logits.device, 16 << 20, 1 << 30)
    rows = max(1, budget // (8 * max(1, logits.shape[1])))
    for s in range(0, len(logits), rows):
        z = logits[s:s + rows].to(torch.float64)
        z -= z.amax(dim=1, keepdim=True)
        yield s, z.exp_()


def _as_scores(scores: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(scores, torch.Tensor):
        return scores.detach()
    return torch.from_numpy(np.ascontiguousarray(scores))


def top_k(scores: np.ndarray | torch.Tensor, k: int, *, ties: str = "index") -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the k largest scores per row, best first; ties: lower index first
    (``ties="torch"``: torch.topk's own order, which the released code inherits; on the CPU it is
    deterministic per row, the same at any thread count or batch, but neither lower nor higher
    index first).
    ``scores`` may be a tensor on a GPU: the selection runs there and only k + 1 columns per row
    (and the rare tied row) come back; both results are host arrays.

    torch.topk does the selection (multi-threaded, far faster than argpartition on large arrays);
    candidates are then ordered by (value desc, index asc). Rows where a tie straddles the k-th
    place are redone exactly, so the result never depends on torch's tie order.
    """
    t = _as_scores(scores)
    n, c = t.shape
    k = min(k, c)
    if ties == "torch":
        vals, idx = torch.topk(t, k, dim=1, sorted=True)
        return idx.cpu().numpy(), vals.cpu().numpy()
    if ties != "index":
        raise ValueError(f"ties must be 'index' or 'torch', got {ties!r}")
    extra = min(k + 1, c)
    vals, idx = torch.topk(t, extra, dim=1, sorted=True)
    vals, idx = vals.cpu().numpy(), idx.cpu().numpy()
    boundary = np.flatnonzero(vals[:, k - 1] == vals[:, k]) if extra > k else []  # a tie at the cut
    order = np.lexsort((idx, -vals), axis=1)
    idx = np.take_along_axis(idx, order, axis=1)[:, :k]
    vals = np.take_along_axis(vals, order, axis=1)[:, :k]
    for r in boundary:  # rare (exact float ties); per-row exact fallback
        row = t[r].cpu().numpy()
        idx[r] = np.lexsort((np.arange(c), -row))[:k]
        vals[r] = row[idx[r]]
    return idx, vals


@dataclass(frozen=True)
class Predictions:
    """Stage-1 CODER logits for N images over the index's classes."""

    class_names: list[str]
    logits: np.ndarray  # [N, C]

    @property
    def probs(self) -> np.ndarray:
        return softmax(self.logits.astype(np.float64)).astype(np.float32)

    @property
    def class_ids(self) -> np.ndarray:
        return self.logits.argmax(axis=1)

    @property
    def labels(self) -> list[str]:
        return [self.class_names[i] for i in self.class_ids]

    def top_k(self, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """(class ids [N, k], softmax probabilities [N, k]), best first."""
        return top_k(self.probs, k)


def zero_shot_classifier(index: TextIndex, kinds: Sequence[str] = GENERAL_KINDS) -> CoderClassifier:
    table = index.text_table(tuple(kinds))
    if len(table) == 0:
        raise ValueError(f"the index at {index.path} holds no texts of kinds {list(kinds)}; "
                         "build it with `coder-index build`")
    return CoderClassifier(table.embeddings, table.class_ids, table.kinds, len(index.class_names()),
                           device=index.compute_device)


def embed_images(index: TextIndex, images: Any, batch_size: int = 64) -> np.ndarray:
    """Accept paths, PIL images, a preprocessed tensor, or precomputed embeddings [N, D]."""
    if hasattr(images, "ndim") and images.ndim == 2:
        return np.asarray(images, dtype=np.float32)
    if isinstance(images, (str, Path)):
        images = [images]
    if not hasattr(images, "ndim"):
        images = [load_image(im) if isinstance(im, (str, Path)) else im for im in images]
    return index.encoder.encode_images(images, batch_size=batch_size)


def explain(index: TextIndex, image_emb: np.ndarray, k: int = 10, n_classes: int = 5,
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
    from .pair_evidence import TOP, pair_evidence

    names = index.class_names()
    coder_logits = index.classifier().logits(image_emb)
    stage1, _ = top_k(coder_logits, max(n_classes, TOP))
    # the rerank's own top-5 (exact ties at the cut in torch.topk's order under cvpr24): its pairs are shown
    rerank_top = stage1 if not index.recipe.is_released else top_k(coder_logits, TOP, ties="torch")[0]
    if scorer is None:
        from .pipeline.scorers import CoderScorer

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


def _class_texts(index: TextIndex, table: Any, sims: np.ndarray, class_id: int, k: int) -> list[dict[str, Any]]:
    """The k texts of one class nearest the image, best first."""
    own = np.flatnonzero(table.class_ids == class_id)
    own = own[np.argsort(-sims[own], kind="stable")[:k]]
    own_meta = index.texts_by_id(table.ids[own])
    return [_hit(own_meta[int(table.ids[j])], float(sims[j])) for j in own]


def _hit(row: dict[str, Any], cosine: float) -> dict[str, Any]:
    return {"text": row["text"], "class": row["class"], "kind": row["kind"], "cosine": round(cosine, 6)}
