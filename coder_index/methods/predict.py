"""Zero-shot prediction and explanation over a text store (METHODS.md §3)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from coder_index.core.decode import load_image
from coder_index.methods.coder import CoderClassifier
from coder_index.model.compute import block_budget

if TYPE_CHECKING:
    from coder_index.stores.text_index import TextStore

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


def zero_shot_classifier(index: TextStore, kinds: Sequence[str] = GENERAL_KINDS) -> CoderClassifier:
    table = index.text_table(tuple(kinds))
    if len(table) == 0:
        raise ValueError(f"the index at {index.path} holds no texts of kinds {list(kinds)}; "
                         "build it with `coder-index build`")
    return CoderClassifier(table.embeddings, table.class_ids, table.kinds, len(index.class_names()),
                           device=index.compute_device)


def coder_classifier(index: TextStore) -> CoderClassifier:
    """The CODER stage-1 classifier over the store's general texts, built once per open store."""
    return index.derived("classifier", lambda: zero_shot_classifier(index))


def embed_images(index: TextStore, images: Any, batch_size: int = 64) -> np.ndarray:
    """Accept paths, PIL images, a preprocessed tensor, or precomputed embeddings [N, D]."""
    if hasattr(images, "ndim") and images.ndim == 2:
        return np.asarray(images, dtype=np.float32)
    if isinstance(images, (str, Path)):
        images = [images]
    if not hasattr(images, "ndim"):
        images = [load_image(im) if isinstance(im, (str, Path)) else im for im in images]
    return index.encoder.encode_images(images, batch_size=batch_size)
