"""X-MoRe predictions over a text index and a corpus: image modality (CLIP or CODER stage 1) plus
the captions of the K nearest corpus images, ensembled by confidence (METHODS.md §6)."""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from coder_index.methods.coder import LOGIT_SCALE
from coder_index.methods.predict import coder_classifier
from coder_index.methods.xmore.ensemble import combine, confidence
from coder_index.methods.zeroshot import zero_shot_weights
from coder_index.stores.corpus import Corpus

if TYPE_CHECKING:
    from coder_index.stores.text_index import TextStore

IMAGE_MODALITIES = {"xmore": "clip", "coder+xmore": "coder"}


class XMore:
    def __init__(self, index: TextStore, corpus: Corpus, k: int = 16, chunk: int = 1024, prompts: str = "auto") -> None:
        corpus.check_model(index.fingerprint)
        self.index, self.corpus, self.k, self.chunk, self.prompts = index, corpus, k, chunk, prompts

    @cached_property
    def w(self) -> np.ndarray:
        """The same W_cls as eval's clip row; computed on first use (it may load the model)."""
        return zero_shot_weights(self.index, self.prompts).weights

    def image_logits(self, x: np.ndarray, modality: str) -> np.ndarray:
        if modality == "clip":
            return LOGIT_SCALE * (x @ self.w.T)
        if modality == "coder":  # CODER stage-1 logits as the image modality: neither paper evaluated this
            return coder_classifier(self.index).logits(x, normalized=True)
        raise ValueError(f"unknown image modality {modality!r}")

    def modality_probs(self, x: np.ndarray, modality: str) -> tuple[np.ndarray, np.ndarray]:
        """(p_img [N, C], p_cap [N, C]) in chunks, so N x K x C never exists for all N at once."""
        p_img = np.empty((len(x), self.w.shape[0]), np.float64)
        p_cap = np.empty_like(p_img)
        for s in range(0, len(x), self.chunk):
            xs = x[s:s + self.chunk]
            li = self.image_logits(xs, modality).astype(np.float64)
            _, ids = self.corpus.search(xs, self.k)
            lc = LOGIT_SCALE * (self.corpus.caption_embeddings(ids) @ self.w.T).astype(np.float64)  # [n, K, C]
            li -= li.max(axis=1, keepdims=True)
            p_img[s:s + len(xs)] = np.exp(li) / np.exp(li).sum(axis=1, keepdims=True)
            lc -= lc.max(axis=2, keepdims=True)
            e = np.exp(lc)
            p_cap[s:s + len(xs)] = (e / e.sum(axis=2, keepdims=True)).mean(axis=1)
        return p_img, p_cap

    def predict(self, x: np.ndarray, method: str = "xmore",
                normalizer: str | tuple[float, float] = "set") -> np.ndarray:
        """[N, C] ensembled probabilities; ``normalizer`` as in ``xmore_ensemble``."""
        return combine(*self.modality_probs(x, IMAGE_MODALITIES[method]), normalizer)

    def normalizers(self, x: np.ndarray, method: str) -> tuple[float, float]:
        """Mean confidences of both modalities over ``x`` (a calibration or the evaluated set)."""
        p_img, p_cap = self.modality_probs(x, IMAGE_MODALITIES[method])
        return float(confidence(p_img).mean()), float(confidence(p_cap).mean())
