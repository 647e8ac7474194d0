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
CALIBRATION_IMAGES = 1000  # corpus images whose mean confidences are the normalisers (a fixed, seeded sample)
CALIBRATION_SEED = 0


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

    def modality_probs(self, x: np.ndarray, modality: str, rows: np.ndarray | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
        """(p_img [N, C], p_cap [N, C]) in chunks, so N x K x C never exists for all N at once. ``rows``:
        ``x`` are these corpus rows' own images, each left out of its neighbours (its own caption would
        make the caption modality look surer than it is for an image from outside)."""
        p_img = np.empty((len(x), self.w.shape[0]), np.float64)
        p_cap = np.empty_like(p_img)
        for s in range(0, len(x), self.chunk):
            xs = x[s:s + self.chunk]
            li = self.image_logits(xs, modality).astype(np.float64)
            if rows is None or self.corpus.index.ntotal <= self.k:  # (a corpus this small has no one to leave out)
                _, ids = self.corpus.search(xs, self.k)
            else:
                ids = _without_self(self.corpus.search(xs, self.k + 1)[1], rows[s:s + self.chunk], self.k)
            caps = self.corpus.caption_embeddings(ids, encode=self.encode_captions)
            lc = LOGIT_SCALE * (caps @ self.w.T).astype(np.float64)  # [n, K, C]
            li -= li.max(axis=1, keepdims=True)
            p_img[s:s + len(xs)] = np.exp(li) / np.exp(li).sum(axis=1, keepdims=True)
            lc -= lc.max(axis=2, keepdims=True)
            e = np.exp(lc)
            p_cap[s:s + len(xs)] = caption_mean(e / e.sum(axis=2, keepdims=True), ids >= 0)
        return p_img, p_cap

    def encode_captions(self, texts: list[str]) -> np.ndarray:
        """Prompted captions of a corpus that encodes them when retrieved: through the index's text
        cache, so that each is encoded once per model."""
        return self.index.encode_texts_cached(texts)

    def predict(self, x: np.ndarray, method: str = "xmore",
                normalizer: str | tuple[float, float] = "set") -> np.ndarray:
        """[N, C] ensembled probabilities; ``normalizer`` as in ``xmore_ensemble``."""
        return combine(*self.modality_probs(x, IMAGE_MODALITIES[method]), normalizer)

    def normalizers(self, x: np.ndarray, method: str, rows: np.ndarray | None = None) -> tuple[float, float]:
        """Mean confidences of both modalities over ``x`` (a calibration or the evaluated set)."""
        p_img, p_cap = self.modality_probs(x, IMAGE_MODALITIES[method], rows)
        return float(confidence(p_img).mean()), float(confidence(p_cap).mean())

    def calibration_key(self, method: str) -> dict[str, object]:
        """What the corpus's normalisers depend on besides the corpus: the index's texts and model, the
        zero-shot prompts, the method and K."""
        return {"index_id": self.index.index_id, "generation": self.index.generation,
                "weights_sha256": self.index.fingerprint.weights_sha256, "prompts": self.prompts,
                "method": method, "k": self.k, "images": CALIBRATION_IMAGES, "seed": CALIBRATION_SEED}

    def corpus_normalizers(self, method: str) -> tuple[float, float]:
        """X-MoRe's default normalisers: the mean confidences of both modalities over a fixed, seeded
        sample of the corpus's own images (each left out of its own neighbours). They belong to the
        corpus, the index and the method, never to the images classified, so an image's probabilities
        depend on that image alone: the same in a folder, alone, resumed, in explain, serve and the
        Python API. Computed when first needed, then kept with the corpus (``Corpus.calibration``)."""
        key = self.calibration_key(method)
        kept = self.corpus.calibration(key)
        if kept is not None:
            return kept
        rows, emb = self.corpus.sample_images(CALIBRATION_IMAGES, CALIBRATION_SEED)
        values = self.normalizers(emb, method, rows)
        self.corpus.keep_calibration(key, values)
        return values


def caption_mean(p: np.ndarray, found: np.ndarray) -> np.ndarray:
    """Mean over the retrieved captions of [n, K, C] probabilities, counting only the neighbours found
    (an approximate index may find fewer than K: a missing one is no caption, not a uniform guess).
    An image with none gets the uniform distribution, whose confidence, 0, gives it no weight."""
    if found.all():
        return p.mean(axis=1)
    w = found.astype(np.float64)[:, :, None]
    n = w.sum(axis=1)
    out = (p * w).sum(axis=1) / np.maximum(n, 1)
    out[n[:, 0] == 0] = 1.0 / p.shape[2]
    return out


def _without_self(ids: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """The first ``k`` neighbours of each row but the row itself (ids [n, k + 1], best first)."""
    keep = ids != rows[:, None]
    keep[keep.sum(axis=1) > k, -1] = False  # the row was not among them: drop the farthest instead
    return ids[keep].reshape(len(ids), k)
