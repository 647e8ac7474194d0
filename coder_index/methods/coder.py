"""CODER features and the stage-1 heuristic classifier (METHODS.md §1 and §3).

Both are array code: one GEMM for the similarities and torch segment reductions for the per-class
max / mean, so nothing loops in Python over images, texts or classes. ``CoderClassifier`` runs on
the CPU or a GPU (``compute``), the same code on both.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch

from coder_index.core.linalg import as_tensor, matmul_t
from coder_index.core.pages import release_pages
from coder_index.core.validation import as_class_ids, as_float_matrix, as_kinds, as_positive_int, l2_normalize
from coder_index.model.compute import exact_float32, on_device, resolve_device

LOGIT_SCALE = 100.0  # CLIP's logit scale: the softmax gap of the rerank gate depends on it
_NAME_KINDS = ("name", "synonym")
# Bytes of float32 similarities one chunk may hold; keeps memory flat for any N x K.
DEFAULT_CHUNK_BYTES = 256 * 1024 * 1024
BLOCK_BYTES = 32 << 20       # similarities CoderClassifier holds at a time (CPU)
PASS_LOGIT_BYTES = 64 << 20  # [C, n] logits of one CoderClassifier pass over the texts (CPU)
# On a GPU: blocks large enough that the GEMM runs near the device's float32 rate
GPU_BLOCK_BYTES = 2 << 30
GPU_PASS_LOGIT_BYTES = 1 << 30


def coder_features(image_emb: Any, text_emb: Any) -> np.ndarray:
    """``[N, K]`` float32 cosine similarities of every image to every text (Eq. 3-6).

    Inputs need not be normalised. The product is accumulated in float32 even when the
    embeddings came from an fp16 encoder. By contract the result is the whole N x K matrix: for a
    large N or K use ``coder_feature_chunks`` (or ``CoderClassifier``, which never holds it).
    """
    x, w = _normalised_pair(image_emb, text_emb)
    return matmul_t(x, w)


def coder_feature_chunks(image_emb: Any, text_emb: Any, chunk_bytes: int = DEFAULT_CHUNK_BYTES
                         ) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, block)`` pairs: ``block`` is ``coder_features`` of images ``start:start + n`` with
    ``n`` chosen so that a block takes at most ``chunk_bytes``; memory stays bounded for any N x K."""
    x, w = _normalised_pair(image_emb, text_emb)
    rows = int(max(1, chunk_bytes // (4 * w.shape[0])))
    for start in range(0, x.shape[0], rows):
        yield start, matmul_t(x[start:start + rows], w)


def _normalised_pair(image_emb: Any, text_emb: Any) -> tuple[np.ndarray, np.ndarray]:
    x = l2_normalize(as_float_matrix(image_emb, "image_emb"), "image_emb")
    w = l2_normalize(as_float_matrix(text_emb, "text_emb"), "text_emb", copy_if_normalized=False)
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"image_emb has width {x.shape[1]} but text_emb has width {w.shape[1]}; "
                         "both must come from the same CLIP model")
    return x, w


@dataclass(frozen=True, eq=False)
class TextLayout:
    """Where each class's texts sit, precomputed once per text set.

    Texts are split in two groups, each ordered by class: name/synonym texts (reduced with max)
    and attribute/analogous texts (reduced with a sum, then averaged with the max). ``order`` is
    the permutation of the text columns into [name/synonym..., attribute/analogous...].
    """

    n_classes: int
    order: np.ndarray          # [K] text index per sorted column
    n_name: int                # number of name/synonym columns (first in ``order``)
    name_starts: np.ndarray    # [C] start column of each class's name/synonym run
    extra_classes: np.ndarray  # classes that have attribute/analogous texts
    extra_starts: np.ndarray   # start column of each of those runs, relative to n_name
    extra_counts: np.ndarray   # [C] number of attribute/analogous texts per class

    @classmethod
    def build(cls, text_class: Any, text_kind: Any, n_classes: int) -> TextLayout:
        n_classes = as_positive_int(n_classes, "n_classes")
        kinds = as_kinds(text_kind, "text_kind", len(text_kind))
        classes = as_class_ids(text_class, "text_class", len(kinds), n_classes)
        if len(kinds) == 0:
            raise ValueError("text_kind is empty; the text set needs at least one name text per class")
        is_name = np.isin(kinds, _NAME_KINDS)
        name_idx = np.flatnonzero(is_name)
        extra_idx = np.flatnonzero(~is_name)
        name_idx = name_idx[np.argsort(classes[name_idx], kind="stable")]
        extra_idx = extra_idx[np.argsort(classes[extra_idx], kind="stable")]

        name_counts = np.bincount(classes[name_idx], minlength=n_classes)
        missing = np.flatnonzero(name_counts == 0)
        if missing.size:
            raise ValueError(
                f"{missing.size} class(es) have no 'name' or 'synonym' text (first ids: "
                f"{missing[:10].tolist()}); check text_class / text_kind, every class needs a name text")
        extra_counts = np.bincount(classes[extra_idx], minlength=n_classes)
        name_starts = np.concatenate([[0], np.cumsum(name_counts)[:-1]])
        extra_classes = np.flatnonzero(extra_counts)
        extra_starts = np.concatenate([[0], np.cumsum(extra_counts[extra_classes])[:-1]]).astype(np.int64)
        return cls(n_classes, np.concatenate([name_idx, extra_idx]), len(name_idx),
                   name_starts.astype(np.int64), extra_classes, extra_starts, extra_counts)

    @property
    def is_sorted(self) -> bool:
        return bool(np.array_equal(self.order, np.arange(len(self.order))))

    @cached_property
    def _segments(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Class id of every sorted column, as index tensors for torch's segment reductions."""
        classes = np.arange(self.n_classes)
        name_counts = np.diff(np.append(self.name_starts, self.n_name))
        name_cls = torch.from_numpy(np.repeat(classes, name_counts))
        extra_cls = torch.from_numpy(np.repeat(classes, self.extra_counts))
        denom = torch.from_numpy((self.extra_counts + 1).astype(np.float32))[:, None]
        return name_cls, extra_cls, denom

    def segments(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``_segments`` on ``device`` (copied there once)."""
        if device.type == "cpu":
            return self._segments
        cache = self.__dict__.setdefault("_device_segments", {})
        if device not in cache:
            cache[device] = tuple(t.to(device) for t in self._segments)
        return cache[device]

    def logits_from_sorted_transposed(self, sims_t: np.ndarray) -> np.ndarray:
        """Stage-1 logits ``[N, C]`` from similarities laid out as ``[K_sorted, N]``.

        In this layout every segment reduction adds or compares whole contiguous rows of N values;
        torch's index_add_/index_reduce_ do that multi-threaded, several times faster than
        ``np.add.reduceat`` (measured in benchmarks/bench_core.py).
        """
        name_cls, extra_cls, denom = self._segments
        s = torch.from_numpy(sims_t)
        n = s.shape[1]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # index_reduce_ is marked beta
            total = torch.full((self.n_classes, n), -torch.inf).index_reduce_(
                0, name_cls, s[: self.n_name], "amax", include_self=True)
        if self.extra_classes.size:
            total.index_add_(0, extra_cls, s[self.n_name:])
        total.mul_(LOGIT_SCALE / denom)
        return total.T.contiguous().numpy()

    def extra_sums(self, text_emb: Any, device: torch.device) -> torch.Tensor:
        """``[C, D]`` float32 sum of each class's attribute/analogous vectors of a sorted ``text_emb``
        (zeros for a class with none), a block of rows at a time, on ``device``. The mean of cosines
        over a class's extra texts is ``x . (their sum) / count``."""
        _, extra_cls, _ = self._segments
        sums = torch.zeros((self.n_classes, text_emb.shape[1]), dtype=torch.float32)
        step = 16384
        for a in range(self.n_name, text_emb.shape[0], step):
            block = text_emb[a:a + step]
            sums.index_add_(0, extra_cls[a - self.n_name:a - self.n_name + len(block)], as_tensor(block))
            release_pages(block)  # classifying reads the name rows and these sums, never these rows again
        return sums.to(device)

    def logits_by_text_blocks(self, text_emb: torch.Tensor, x: torch.Tensor, text_rows: int,
                              extra_sums: torch.Tensor) -> torch.Tensor:
        """Stage-1 logits ``[n, C]`` (a tensor on the inputs' device) of images ``x`` against a sorted
        ``text_emb``: the max over each class's name/synonym similarities, computed ``[text_rows, n]``
        at a time, plus the sum over its other texts as one product with ``extra_sums`` (the sum of
        cosines is the cosine with the summed vectors: no per-text similarity is needed for them).
        Equal to ``logits_from_sorted_transposed`` of the full product up to float32 rounding. Callers
        run it inside ``compute.exact_float32()``."""
        name_cls, _, denom = self.segments(x.device)
        total = torch.full((self.n_classes, len(x)), -torch.inf, device=x.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # index_reduce_ is marked beta
            for a in range(0, self.n_name, text_rows):
                b = min(self.n_name, a + text_rows)
                total.index_reduce_(0, name_cls[a:b], text_emb[a:b] @ x.T, "amax", include_self=True)
        if self.extra_classes.size:
            total += extra_sums @ x.T
        total.mul_(LOGIT_SCALE / denom)
        return total.T


def heuristic_logits(coder: Any, text_class: Any, text_kind: Any, n_classes: int) -> np.ndarray:
    """Stage-1 zero-shot logits (Eq. 7-8): ``[N, C]`` float32.

    ``o_j = 100 * mean(s[attribute] ⊕ s[analogous] ⊕ [max(s[name] ⊕ s[synonym])])`` over class j's
    texts; a class with no attribute/analogous texts scores ``100 * max(name ⊕ synonym)``.
    """
    sims = as_float_matrix(coder, "coder")
    if len(text_class) != sims.shape[1]:
        raise ValueError(f"text_class has {len(text_class)} entries but coder has {sims.shape[1]} columns")
    if len(text_kind) != sims.shape[1]:
        raise ValueError(f"text_kind has {len(text_kind)} entries but coder has {sims.shape[1]} columns")
    layout = TextLayout.build(text_class, text_kind, n_classes)
    # Row blocks: only a block is ever permuted and transposed, never the whole N x K input.
    rows = int(max(1, min(4096, DEFAULT_CHUNK_BYTES // (4 * sims.shape[1]))))
    out = np.empty((sims.shape[0], layout.n_classes), dtype=np.float32)
    for s in range(0, sims.shape[0], rows):
        block = sims[s:s + rows]
        block_t = block.T if layout.is_sorted else block[:, layout.order].T
        out[s:s + len(block)] = layout.logits_from_sorted_transposed(np.ascontiguousarray(block_t))
    return out


def image_matrix(image_emb: Any, dim: int, normalized: bool) -> np.ndarray:
    """Checked float32 image embeddings of width ``dim``, L2-normalised unless they already are."""
    x = as_float_matrix(image_emb, "image_emb")
    if x.shape[1] != dim:
        raise ValueError(f"image_emb has width {x.shape[1]} but the texts have width {dim}; "
                         "both must come from the same CLIP model")
    return x if normalized else l2_normalize(x, "image_emb")


class CoderClassifier:
    """Fused CODER + heuristic logits over a fixed text set, chunked so memory stays bounded.

    Text embeddings are normalised and permuted into the layout's order once; each call is then
    one GEMM per chunk plus two segment reductions, and no ``[N, K]`` array outlives a chunk.
    """

    def __init__(self, text_emb: Any, text_class: Any, text_kind: Any, n_classes: int,
                 chunk_bytes: int | None = None, image_rows: int | None = None,
                 device: str | torch.device | None = None) -> None:
        # An index's matrix is stored normalised and class-ordered (memory-mapped): it is used as it
        # is, so opening an index and classifying holds the matrix once.
        rows = len(text_emb)
        if len(text_class) != rows or len(text_kind) != rows:
            raise ValueError(f"text_emb has {rows} rows but text_class has {len(text_class)} and "
                             f"text_kind {len(text_kind)} entries; they must align")
        # The layout's temporaries come and go before the checks read the whole matrix into memory.
        self.layout = TextLayout.build(text_class, text_kind, n_classes)
        w = l2_normalize(as_float_matrix(text_emb, "text_emb"), "text_emb", copy_if_normalized=False)
        self.text_emb = w if self.layout.is_sorted else np.ascontiguousarray(w[self.layout.order])
        self.device = resolve_device(device) if device is not None else torch.device("cpu")
        gpu = self.device.type != "cpu"
        # Images per pass over the matrix: every pass reads all of it, so as many as the [C, n] logits
        # of a pass allow (at most 4096 on the CPU, which keeps the blocks cache-friendly).
        pass_bytes = GPU_PASS_LOGIT_BYTES if gpu else PASS_LOGIT_BYTES
        self.chunk_rows = int(image_rows or min(65536 if gpu else 4096,
                                                max(1, pass_bytes // (4 * self.layout.n_classes))))
        # Texts per block: a pass holds [text_rows, n] similarities at a time, never [K, n] (256 MB at
        # 1M texts and 64 images), so memory beyond the one copy of the matrix does not grow with K.
        budget = chunk_bytes or (GPU_BLOCK_BYTES if gpu else BLOCK_BYTES)
        self.text_rows = int(min(w.shape[0], max(1, budget // (4 * self.chunk_rows))))
        # On the CPU the tensor is the matrix itself (no copy); on a GPU, its one copy in GPU memory.
        self._w = on_device(self.text_emb, self.device)
        self._extra_sums = self.layout.extra_sums(self.text_emb, self.device)

    @property
    def dim(self) -> int:
        return int(self.text_emb.shape[1])

    def logits(self, image_emb: Any, *, normalized: bool = False) -> np.ndarray:
        """Stage-1 logits ``[N, C]`` float32 on the host."""
        return self.logits_on_device(image_emb, normalized=normalized).cpu().numpy()

    def logits_on_device(self, image_emb: Any, *, normalized: bool = False) -> torch.Tensor:
        """Stage-1 logits ``[N, C]`` as a float32 tensor on this classifier's device (the scorers take
        their top k there, so only k columns per image come back to the host)."""
        x = on_device(image_matrix(image_emb, self.dim, normalized), self.device)
        out = torch.empty((x.shape[0], self.layout.n_classes), device=self.device)
        with exact_float32():
            for start in range(0, x.shape[0], self.chunk_rows):
                chunk = x[start:start + self.chunk_rows]
                out[start:start + len(chunk)] = self.layout.logits_by_text_blocks(self._w, chunk, self.text_rows,
                                                                                  self._extra_sums)
        return out
