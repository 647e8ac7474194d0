"""CODER-Adapter: a training-free cache model whose keys are support CODERs (Eq. 16-20).

    s = x's CODER row, L2-normalised;   a = s @ S^T  (S: support CODER rows, L2-normalised)
    a <- (a - min_row) / (max_row - min_row) / T      (per test row, into [0, 1], then / T)
    A = exp(-beta * (1 - a));           o = o_zs + alpha * A @ L   (L: one-hot support labels)

The Tip-Adapter baseline uses raw image embeddings as keys and, as in Tip-Adapter, no min-max.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from coder_index.core.validation import as_class_ids, as_float_matrix, as_positive_int, l2_normalize


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


@dataclass(frozen=True)
class SearchGrid:
    """The hyper-parameter grid: ``beta_steps`` x ``alpha_steps`` values on [lo, hi) (the released
    loop's ``i * (hi - lo) / steps + lo``), then ``rounds - 1`` more grids on [0.5x, 1.5x) of the
    previous round's best. Each round starts from accuracy 0 and keeps the first strictly better
    point in loop order (beta outer, alpha inner); the result is the last round's best."""

    beta_range: tuple[float, float] = (0.1, 200.0)
    alpha_range: tuple[float, float] = (0.1, 20.0)
    beta_steps: int = 500
    alpha_steps: int = 50
    rounds: int = 3


SEARCHES = {"released": SearchGrid(), "fast": SearchGrid(beta_steps=100, alpha_steps=20)}


def grid_values(lo: float, hi: float, steps: int) -> np.ndarray:
    """``[i * (hi - lo) / steps + lo for i in range(steps)]``, the same float64 operations in the same order."""
    return (np.arange(steps, dtype=np.float64) * (hi - lo)) / steps + lo


class CacheLogits:
    """``exp(-beta * (1 - a)) @ L`` for one normalised affinity matrix ``a`` [N, M] and one-hot ``L``,
    in float64 (float32 would run into denormals: exp(-200) is below float32's normal range, and
    such arithmetic is an order of magnitude slower on CPUs).

    With the same number of shots per class (the usual case) the product with ``L`` is a sum over
    shots: the support columns are reordered shot-major once, and the per-class sums are S - 1
    whole-array additions instead of an [N, M] x [M, C] product.
    """

    def __init__(self, affinity: np.ndarray, labels: np.ndarray, n_classes: int) -> None:
        d = torch.from_numpy(np.ascontiguousarray(affinity, dtype=np.float64)) - 1.0   # a - 1 <= 0
        labels = np.asarray(labels, dtype=np.int64)
        counts = np.bincount(labels, minlength=n_classes)
        self.n_classes = n_classes
        self.shots = int(counts[0]) if counts.size and (counts == counts[0]).all() and counts[0] > 0 else 0
        if self.shots:
            # column s * C + c holds shot s of class c
            order = np.argsort(labels, kind="stable").reshape(n_classes, self.shots).T.reshape(-1)
            self.d = d[:, torch.from_numpy(order)].contiguous()
        else:
            self.d = d
            self.onehot = torch.from_numpy(np.eye(n_classes, dtype=np.float64)[labels])
        self._buf = torch.empty_like(self.d)

    def __call__(self, beta: float) -> torch.Tensor:
        torch.mul(self.d, float(beta), out=self._buf).exp_()       # exp(beta (a - 1)) = exp(-beta (1 - a))
        if not self.shots:
            return self._buf @ self.onehot
        c = self.n_classes
        out = self._buf[:, :c].clone()
        for s in range(1, self.shots):   # over shots only (at most a few dozen), never over images or classes
            out += self._buf[:, s * c:(s + 1) * c]
        return out


_U = float(np.finfo(np.float64).eps)  # unit roundoff x 2; the bands below are generous on purpose


class AlphaCounter:
    """Number of rows with ``argmax(zs + alpha * cache) == y`` for every alpha at once.

    For an image, its class y beats class c where ``dz_c + alpha * dk_c > 0`` (dz = zs_y - zs_c,
    dk = cache_y - cache_c): a half-line in alpha. So the alphas where y wins form one interval
    (lo, hi), found with O(C) work per image instead of O(C) per image *and* alpha. Where an alpha
    lies within rounding distance of a bound (or two cache values are equal), the decision is taken
    by evaluating ``zs + alpha * cache`` directly, so the counts equal the direct computation's,
    ties (first index wins) included. What depends on zs and y alone is computed once.
    """

    def __init__(self, zs: torch.Tensor, y: torch.Tensor) -> None:
        n, c = zs.shape
        self.zs, self.y, self.y1 = zs, y, y[:, None]
        self.neg_dz = zs - zs.gather(1, self.y1)                           # -(zs_y - zs_c)
        self.scale_z = zs.gather(1, self.y1).abs() + zs.abs()
        self.own = torch.zeros((n, c), dtype=torch.bool)
        self.own[torch.arange(n), y] = True

    def __call__(self, cache: torch.Tensor, alphas: np.ndarray) -> np.ndarray:
        ky = cache.gather(1, self.y1)
        dk = ky - cache                                                    # [N, C]
        pos, neg = dk > 0, dk < 0
        b = self.neg_dz / dk                                               # alpha where y and c tie (inf/nan: unused)
        absb = b.abs()
        # rounding band around each bound: |alpha - b| below it cannot be decided from b
        eps = cache.abs().add_(ky.abs()).mul_(absb).add_(self.scale_z).div_(dk.abs()).add_(absb).mul_(16 * _U)
        lo_plus = (b + eps).masked_fill_(~pos, -np.inf).amax(1)
        lo_minus = (b - eps).masked_fill_(~pos, -np.inf).amax(1)
        hi_minus = (b - eps).masked_fill_(~neg, np.inf).amin(1)
        hi_plus = (b + eps).masked_fill_(~neg, np.inf).amin(1)
        # equal cache values: the alpha term cancels; zs decides (ties go to the lower class index)
        flat = (dk == 0) & ~self.own
        if flat.any():
            amax = float(np.max(alphas)) if len(alphas) else 0.0
            band = 8 * _U * (self.scale_z + 2 * amax * (ky.abs() + cache.abs()))
            never = (flat & (self.neg_dz > band)).any(1)
            unsure_always = (flat & (self.neg_dz.abs() <= band)).any(1)
        else:
            never = unsure_always = torch.zeros(len(ky), dtype=torch.bool)
        al = torch.from_numpy(np.asarray(alphas, dtype=np.float64))[:, None]      # [A, 1]
        sure_right = (al > lo_plus) & (al < hi_minus) & ~never & ~unsure_always  # [A, N]
        sure_wrong = (al < lo_minus) | (al > hi_plus) | never
        counts = sure_right.sum(1).numpy().astype(np.int64)
        unsure = ~(sure_right | sure_wrong)
        if unsure.any():
            ai, ni = torch.nonzero(unsure, as_tuple=True)
            direct = (self.zs[ni] + al[ai] * cache[ni]).argmax(1) == self.y[ni]   # torch.argmax: first maximum
            np.add.at(counts, ai.numpy(), direct.numpy().astype(np.int64))
        return counts


def count_correct(zs: torch.Tensor, cache: torch.Tensor, y: torch.Tensor, alphas: np.ndarray) -> np.ndarray:
    """``AlphaCounter(zs, y)(cache, alphas)``: correct rows of ``zs + alpha * cache`` per alpha."""
    return AlphaCounter(zs, y)(cache, alphas)


def grid_search(cache_logits: CacheLogits, zs_logits: np.ndarray, labels: np.ndarray, grid: SearchGrid
                ) -> tuple[float, float, int, list[dict[str, Any]]]:
    """(beta, alpha, correct count, per-round history) of ``grid``, as the released loop picks them."""
    zs = torch.from_numpy(np.ascontiguousarray(zs_logits, dtype=np.float64))
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    counter = AlphaCounter(zs, y)
    b_lo, b_hi = grid.beta_range
    a_lo, a_hi = grid.alpha_range
    history = []
    best_beta = best_alpha = 0.0
    best = 0
    for round_no in range(grid.rounds):
        betas = grid_values(b_lo, b_hi, grid.beta_steps)
        alphas = grid_values(a_lo, a_hi, grid.alpha_steps)
        best, best_beta, best_alpha = 0, 0.0, 0.0   # the released loop restarts from accuracy 0 each round
        for beta in betas:
            counts = counter(cache_logits(beta), alphas)
            j = int(np.argmax(counts))              # first alpha with the row's maximum
            if counts[j] > best:                    # strictly better, as `if acc > best_acc`
                best, best_beta, best_alpha = int(counts[j]), float(beta), float(alphas[j])
        history.append({"round": round_no, "betas": [float(betas[0]), float(betas[-1]), len(betas)],
                        "alphas": [float(alphas[0]), float(alphas[-1]), len(alphas)],
                        "best": {"beta": best_beta, "alpha": best_alpha, "accuracy": best / len(y)}})
        b_lo, b_hi = best_beta * 0.5, best_beta * 1.5
        a_lo, a_hi = best_alpha * 0.5, best_alpha * 1.5
    return best_beta, best_alpha, best, history


def search_hyperparameters(adapter: CacheAdapter, val_features: Any, val_labels: Any, val_zs_logits: Any, *,
                           search: str | SearchGrid = "released", init: tuple[float, float] | None = None
                           ) -> dict[str, Any]:
    """Best (alpha, beta) on VALIDATION data over the released grid (``search='fast'``: a coarser
    one). Takes only validation arrays: test data cannot reach it. ``init`` (alpha, beta) is
    evaluated and reported too, but the searched values are the result: the released code reports
    max(test accuracy at init, after search), which peeks at the test set."""
    grid = SEARCHES[search] if isinstance(search, str) else search
    a = adapter.affinity(val_features)
    y = as_class_ids(val_labels, "val_labels", a.shape[0], adapter.values_.shape[1])
    zs = as_float_matrix(val_zs_logits, "val_zs_logits")
    cache = CacheLogits(a, adapter.values_.argmax(1), adapter.values_.shape[1])
    beta, alpha, correct, history = grid_search(cache, zs, y, grid)
    if correct == 0:
        raise ValueError("no (alpha, beta) of the grid classifies any validation image correctly; the validation "
                         "set or the labels are wrong")
    adapter.beta, adapter.alpha = beta, alpha
    out = {"beta": beta, "alpha": alpha, "T": adapter.T, "val_accuracy": correct / len(y),
           "val_zero_shot_accuracy": float((zs.argmax(1) == y).mean()), "val_images": int(len(y)),
           "search": search if isinstance(search, str) else asdict(grid), "rounds": history}
    if init is not None:
        hit = count_correct(torch.from_numpy(np.asarray(zs, dtype=np.float64)), cache(init[1]), torch.from_numpy(y),
                            np.array([init[0]]))
        out["init"] = {"alpha": float(init[0]), "beta": float(init[1]), "val_accuracy": int(hit[0]) / len(y)}
    return out
