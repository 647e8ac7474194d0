"""CODER-Adapter: a training-free cache model whose keys are support CODERs (Eq. 16-20).

    s = x's CODER row, L2-normalised;   a = s @ S^T  (S: support CODER rows, L2-normalised)
    a <- (a - min_row) / (max_row - min_row) / T      (per test row, into [0, 1], then / T)
    A = exp(-beta * (1 - a));           o = o_zs + alpha * A @ L   (L: one-hot support labels)

The Tip-Adapter baseline uses raw image embeddings as keys and, as in Tip-Adapter, no min-max.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..validation import as_class_ids, as_float_matrix, as_positive_int, l2_normalize


def minmax_rows(a: np.ndarray) -> np.ndarray:
    """Per-row min-max into [0, 1]; a row with no spread maps to 1 (every key equally close)."""
    lo = a.min(axis=1, keepdims=True)
    span = a.max(axis=1, keepdims=True) - lo
    out = np.ones_like(a)
    np.divide(a - lo, span, out=out, where=span > 0)
    return out


class CacheAdapter:
    """Shared machinery of CODER-Adapter and Tip-Adapter (sklearn-style: params in __init__)."""

    minmax = True

    def __init__(self, alpha: float, beta: float, T: float = 1.0) -> None:  # noqa: N803 - the paper's name
        for name, v in (("alpha", alpha), ("beta", beta), ("T", T)):
            if not np.isfinite(v) or (name != "alpha" and v <= 0):
                raise ValueError(f"{name} must be a finite{' positive' if name != 'alpha' else ''} number, got {v}")
        self.alpha, self.beta, self.T = float(alpha), float(beta), float(T)
        self.keys_: np.ndarray | None = None
        self.values_: np.ndarray | None = None

    def fit(self, support: Any, labels: Any, n_classes: int) -> CacheAdapter:
        keys = l2_normalize(as_float_matrix(support, "support_coder"), "support_coder")
        n_classes = as_positive_int(n_classes, "n_classes")
        y = as_class_ids(labels, "labels", keys.shape[0], n_classes)
        self.keys_ = keys
        self.values_ = np.eye(n_classes, dtype=np.float32)[y]
        return self

    def affinity(self, test: Any) -> np.ndarray:
        """Normalised affinity ``a`` [N, M] (before the exponential)."""
        if self.keys_ is None:
            raise ValueError("the adapter is not fitted; call fit(support, labels, n_classes) first")
        s = l2_normalize(as_float_matrix(test, "test_coder"), "test_coder")
        if s.shape[1] != self.keys_.shape[1]:
            raise ValueError(f"test_coder has {s.shape[1]} columns, the support {self.keys_.shape[1]}; "
                             "both must use the same text set")
        a = s @ self.keys_.T
        return (minmax_rows(a) if self.minmax else a) / self.T

    def logits(self, test: Any, zs_logits: Any) -> np.ndarray:
        a = self.affinity(test)
        zs = as_float_matrix(zs_logits, "zs_logits")
        if zs.shape != (a.shape[0], self.values_.shape[1]):
            raise ValueError(f"zs_logits must have shape {(a.shape[0], self.values_.shape[1])}, got {zs.shape}")
        return zs + self.alpha * (np.exp(-self.beta * (1.0 - a)) @ self.values_)


class CoderAdapter(CacheAdapter):
    """``CoderAdapter(alpha, beta, T=1.0).fit(support_coder, labels, n_classes).logits(test_coder, zs)``."""

    minmax = True


class TipAdapter(CacheAdapter):
    """Tip-Adapter (training-free): raw image embeddings as keys, no min-max of the affinity."""

    minmax = False


def neighbour_cache_logits(sims: np.ndarray, ids: np.ndarray, labels: np.ndarray, n_classes: int, beta: float,
                           T: float = 1.0, minmax: bool = True,  # noqa: N803
                           row_min: np.ndarray | None = None) -> np.ndarray:
    """``A @ L`` from a search of the support keys: ``sims``/``ids`` [N, k] of the k nearest keys.

    With k = all keys this equals the exact adapter. With fewer, only the k nearest keys contribute:
    the approximation for large support sets. Pass the true ``row_min`` (one more search, with the
    negated query, finds the farthest key) so that the min-max is exact and only the smallest terms
    are dropped; without it the min-max runs over the k affinities. benchmarks/bench_fewshot.py
    measures the accuracy cost of both.
    """
    a = np.asarray(sims, dtype=np.float32)
    if minmax and row_min is not None:
        lo = np.asarray(row_min, dtype=np.float32).reshape(-1, 1)
        span = a.max(axis=1, keepdims=True) - lo
        a = np.divide(a - lo, span, out=np.ones_like(a), where=span > 0)
    elif minmax:
        a = minmax_rows(a)
    weights = torch.from_numpy(np.exp(-beta * (1.0 - a / T)).astype(np.float32))
    out = torch.zeros((a.shape[0], n_classes))
    out.scatter_add_(1, torch.from_numpy(np.asarray(labels, dtype=np.int64)[ids]), weights)
    return out.numpy()


def default_grid(beta_steps: int = 40, alpha_steps: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """beta in [0.1, 200], alpha in [0.1, 20] (METHODS.md §5)."""
    return np.linspace(0.1, 200.0, beta_steps), np.linspace(0.1, 20.0, alpha_steps)


def grid_accuracy(affinity: np.ndarray, values: np.ndarray, zs_logits: np.ndarray, labels: np.ndarray,
                  betas: np.ndarray, alphas: np.ndarray, max_elements: int = 2**25) -> np.ndarray:
    """Validation accuracy [len(betas), len(alphas)] from ONE affinity matrix.

    For a chunk of betas, ``exp(-beta (1 - a)) @ L`` is one batched product; every alpha is then a
    broadcast add and an argmax. No loop over images or grid points (only over beta chunks, to
    bound memory).
    """
    a = torch.from_numpy(np.ascontiguousarray(affinity, dtype=np.float32))
    vals = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    zs = torch.from_numpy(np.ascontiguousarray(zs_logits, dtype=np.float32))
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    al = torch.from_numpy(np.asarray(alphas, dtype=np.float32))
    n, m = a.shape
    c = vals.shape[1]
    step = max(1, max_elements // max(n * max(m, len(alphas) * c), 1))
    out = np.empty((len(betas), len(alphas)))
    one_minus = 1.0 - a
    for start in range(0, len(betas), step):
        b = torch.from_numpy(np.asarray(betas[start:start + step], dtype=np.float32))
        cache = torch.exp(-b[:, None, None] * one_minus[None]) @ vals           # [B, N, C]
        scores = zs[None, None] + al[None, :, None, None] * cache[:, None]      # [B, A, N, C]
        out[start:start + len(b)] = (scores.argmax(-1) == y).float().mean(-1).numpy()
    return out


def search_hyperparameters(adapter: CacheAdapter, val_features: Any, val_labels: Any, val_zs_logits: Any, *,
                           beta_steps: int = 40, alpha_steps: int = 20, refine_steps: int = 10,
                           refinements: int = 2) -> dict[str, Any]:
    """Best (alpha, beta) on VALIDATION data: the grid, then ``refinements`` finer grids on
    [0.5x, 1.5x] of the best. Takes only validation arrays: test data cannot reach it."""
    a = adapter.affinity(val_features)
    y = as_class_ids(val_labels, "val_labels", a.shape[0], adapter.values_.shape[1])
    zs = as_float_matrix(val_zs_logits, "val_zs_logits")
    betas, alphas = default_grid(beta_steps, alpha_steps)
    history = []
    best = None
    for round_no in range(refinements + 1):
        acc = grid_accuracy(a, adapter.values_, zs, y, betas, alphas)
        i, j = np.unravel_index(int(np.argmax(acc)), acc.shape)  # first best: smallest beta, then alpha
        if best is None or acc[i, j] > best[2]:
            best = (float(betas[i]), float(alphas[j]), float(acc[i, j]))
        history.append({"round": round_no, "betas": [float(betas[0]), float(betas[-1]), len(betas)],
                        "alphas": [float(alphas[0]), float(alphas[-1]), len(alphas)],
                        "best": {"beta": float(betas[i]), "alpha": float(alphas[j]), "accuracy": float(acc[i, j])}})
        betas = np.linspace(0.5 * best[0], 1.5 * best[0], refine_steps)
        alphas = np.linspace(0.5 * best[1], 1.5 * best[1], refine_steps)
    adapter.beta, adapter.alpha = best[0], best[1]
    zs_acc = float((zs.argmax(1) == y).mean())
    return {"beta": best[0], "alpha": best[1], "T": adapter.T, "val_accuracy": best[2],
            "val_zero_shot_accuracy": zs_acc, "val_images": int(len(y)), "rounds": history}
