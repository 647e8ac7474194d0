"""The X-MoRe modality ensemble (METHODS.md §6).

    p_img = softmax(l_img)                 p_cap = mean_k softmax(l_cap_k)
    c     = 1 - H(p) / log C               (confidence of a modality)
    w     = c / mean(c over the evaluated set)
    p     = w_img * p_img + w_cap * p_cap

The released code divides each confidence by a running sum over the images seen so far, which
makes a prediction depend on evaluation order; that is available as ``normalizer="running"`` (and
``running_weights`` carries it over batches) for reproducing it. ``classify`` normalises by default
with means over a sample of the corpus's own images (``XMore.corpus_normalizers``): an image's
answer then depends on that image alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from coder_index.core.validation import as_float_matrix, to_numpy


def _softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def confidence(p: np.ndarray) -> np.ndarray:
    """1 - normalised entropy of each row of probabilities (1: one-hot, 0: uniform)."""
    c = p.shape[-1]
    if c < 2:
        return np.ones(p.shape[:-1])
    h = -(p * np.log(np.clip(p, 1e-30, None))).sum(axis=-1)
    return 1.0 - h / np.log(c)


def modality_probs(image_logits: Any, caption_logits: Any) -> tuple[np.ndarray, np.ndarray]:
    li = as_float_matrix(image_logits, "image_logits").astype(np.float64)
    lc = to_numpy(caption_logits)
    if lc.ndim != 3:
        raise ValueError(f"caption_logits must be [N, K, C], got shape {lc.shape}")
    lc = as_float_matrix(lc.reshape(lc.shape[0], -1), "caption_logits").reshape(lc.shape).astype(np.float64)
    if lc.shape[0] != li.shape[0] or lc.shape[2] != li.shape[1]:
        raise ValueError(f"caption_logits {lc.shape} does not match image_logits {li.shape} ([N, K, C] vs [N, C])")
    return _softmax(li), _softmax(lc).mean(axis=1)


def xmore_ensemble(image_logits: Any, caption_logits: Any, normalizer: str | tuple[float, float] = "set"
                   ) -> np.ndarray:
    """``[N, C]`` ensemble of image-modal and caption-modal predictions.

    ``normalizer``: ``"set"`` (mean confidence over these N images: order-independent), a
    ``(mean_c_img, mean_c_cap)`` pair from a calibration set, or ``"running"`` (the released
    code's running sum, order-dependent).
    """
    return combine(*modality_probs(image_logits, caption_logits), normalizer)


def running_weights(p_img: np.ndarray, p_cap: np.ndarray, sums: tuple[float, float] = (0.0, 0.0)
                    ) -> tuple[np.ndarray, tuple[float, float]]:
    """The released running normaliser carried over batches: each image's confidence over the running
    sum of the confidences of the images before it and itself (``sums``: the sums of the batches
    before); returns the ensemble and the new sums. The same as ``combine(..., "running")`` over all
    the batches at once."""
    c_img, c_cap = confidence(p_img), confidence(p_cap)
    run_img = sums[0] + np.cumsum(c_img)
    run_cap = sums[1] + np.cumsum(c_cap)
    w_img = c_img / np.maximum(run_img, 1e-12)
    w_cap = c_cap / np.maximum(run_cap, 1e-12)
    probs = (w_img[:, None] * p_img + w_cap[:, None] * p_cap).astype(np.float32)
    return probs, (float(run_img[-1]) if len(run_img) else sums[0], float(run_cap[-1]) if len(run_cap) else sums[1])


def combine(p_img: np.ndarray, p_cap: np.ndarray, normalizer: str | tuple[float, float] = "set") -> np.ndarray:
    """The weighted sum of the two modalities' probabilities (see ``xmore_ensemble``)."""
    c_img, c_cap = confidence(p_img), confidence(p_cap)
    if isinstance(normalizer, tuple):
        n_img, n_cap = (float(v) for v in normalizer)
        if not (n_img > 0 and n_cap > 0):
            raise ValueError("calibration normalizers must be positive")
        w_img, w_cap = c_img / n_img, c_cap / n_cap
    elif normalizer == "set":
        w_img, w_cap = c_img / max(c_img.mean(), 1e-12), c_cap / max(c_cap.mean(), 1e-12)
    elif normalizer == "running":
        w_img = c_img / np.maximum(np.cumsum(c_img), 1e-12)
        w_cap = c_cap / np.maximum(np.cumsum(c_cap), 1e-12)
    else:
        raise ValueError(f"normalizer must be 'set', 'running' or (mean_c_img, mean_c_cap), got {normalizer!r}")
    return (w_img[:, None] * p_img + w_cap[:, None] * p_cap).astype(np.float32)
