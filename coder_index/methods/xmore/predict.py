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
RETRIEVALS = ("nearest", "released")
# The released retrieval (create_cache.py, CaptionCache): 200 neighbours asked for (1,000 when fewer than
# 128 come back), the first 128 captions, duplicates removed, ordered by the raw image-caption features'
# product, the first K kept; each then encoded behind the prompt learner's ctx_init, "a_photo_of_a"
# (underscores included: the prompt learner replaces them, caption_ensemble uses the raw string).
RELEASED_ASK, RELEASED_ASK_MORE, RELEASED_KEEP = 200, 1000, 128
RELEASED_CAPTION_PROMPT = "a_photo_of_a {caption}"
_SUB = 64  # images per step of the released ordering (bounds [n, 128, D] in memory)
CALIBRATION_IMAGES = 1000  # corpus images whose mean confidences are the normalisers (a fixed, seeded sample)
CALIBRATION_SEED = 0


class XMore:
    def __init__(self, index: TextStore, corpus: Corpus, k: int = 16, chunk: int = 1024, prompts: str = "auto",
                 retrieval: str = "nearest") -> None:
        """``retrieval``: ``nearest`` (the captions of the K nearest corpus images, as they come) or
        ``released`` (the released code's order: see RELEASED_*)."""
        corpus.check_model(index.fingerprint)
        if retrieval not in RETRIEVALS:
            raise ValueError(f"retrieval must be one of {', '.join(RETRIEVALS)}, got {retrieval!r}")
        self.index, self.corpus, self.k, self.chunk, self.prompts = index, corpus, k, chunk, prompts
        self.retrieval = retrieval

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
            part = None if rows is None else rows[s:s + self.chunk]
            if self.retrieval == "released":
                caps, found = self.released_captions(xs, part)
            else:
                ids = self.neighbours(xs, self.k, part)
                caps, found = self.corpus.caption_embeddings(ids, encode=self.encode_captions), ids >= 0
            lc = LOGIT_SCALE * (caps @ self.w.T).astype(np.float64)  # [n, K, C]
            li -= li.max(axis=1, keepdims=True)
            p_img[s:s + len(xs)] = np.exp(li) / np.exp(li).sum(axis=1, keepdims=True)
            lc -= lc.max(axis=2, keepdims=True)
            e = np.exp(lc)
            p_cap[s:s + len(xs)] = caption_mean(e / e.sum(axis=2, keepdims=True), found)
        return p_img, p_cap

    def neighbours(self, x: np.ndarray, k: int, rows: np.ndarray | None = None) -> np.ndarray:
        """[n, k] corpus rows nearest to ``x`` (-1 where an approximate index found fewer); ``rows``:
        ``x`` are these corpus rows' images, each left out of its own neighbours."""
        if rows is None or self.corpus.ntotal <= k:  # (a corpus this small has no one to leave out)
            return self.corpus.search(x, k)[1]
        return _without_self(self.corpus.search(x, k + 1)[1], rows, k)

    def released_captions(self, x: np.ndarray, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """([n, K, D] prompted-caption embeddings, [n, K] found) by the released rule (RELEASED_*):
        vectorised over images, each distinct caption encoded once (through the text cache)."""
        ids, texts = self._first_captions(x, RELEASED_ASK, rows)
        short = (ids >= 0).sum(axis=1) < min(RELEASED_KEEP, self.corpus.ntotal)
        if short.any() and self.corpus.ntotal > RELEASED_ASK:  # the released code asks again for 1,000
            ids[short], texts[short] = self._first_captions(x[short], RELEASED_ASK_MORE,
                                                            None if rows is None else rows[short])
        # each row's captions as codes of distinct texts; a caption seen before in its row is a duplicate
        found = ids >= 0
        distinct, codes = np.unique(texts.astype(str), return_inverse=True)
        codes = codes.reshape(ids.shape)
        keep = found & _first_in_row(np.where(found, codes, -1))
        raw = self.index.encode_texts_cached(list(distinct), normalize=False)  # the order's key: raw features
        order_key = np.full(ids.shape, -np.inf)
        for s in range(0, len(x), _SUB):
            order_key[s:s + _SUB] = np.einsum("nd,nkd->nk", x[s:s + _SUB], raw[codes[s:s + _SUB]])
        order_key[~keep] = -np.inf
        best = np.argsort(-order_key, axis=1, kind="stable")[:, :self.k]
        chosen = np.take_along_axis(codes, best, axis=1)
        chosen_found = np.isfinite(np.take_along_axis(order_key, best, axis=1))
        prompted = self.index.encode_texts_cached(
            [RELEASED_CAPTION_PROMPT.replace("{caption}", str(t)) for t in distinct])
        caps = prompted[chosen]
        caps[~chosen_found] = 0
        return caps, chosen_found

    def _first_captions(self, x: np.ndarray, ask: int, rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """([n, RELEASED_KEEP] ids, -1 past the hits; the same shape of captions, "" there) of the first
        RELEASED_KEEP of ``ask`` neighbours. The captions are read at once: a service knows the captions
        of its last answer only."""
        ids = self.neighbours(x, ask, rows)[:, :RELEASED_KEEP]
        if ids.shape[1] < RELEASED_KEEP:
            ids = np.pad(ids, ((0, 0), (0, RELEASED_KEEP - ids.shape[1])), constant_values=-1)
        texts = np.full(ids.shape, "", dtype=object)
        found = ids >= 0
        texts[found] = self.corpus.captions(ids[found])
        return ids, texts

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
        key = {"index_id": self.index.index_id, "generation": self.index.generation,
               "weights_sha256": self.index.fingerprint.weights_sha256, "prompts": self.prompts,
               "method": method, "k": self.k, "images": CALIBRATION_IMAGES, "seed": CALIBRATION_SEED}
        if self.retrieval != "nearest":  # (the key of the normalisers kept before there was a choice)
            key["retrieval"] = self.retrieval
        return key

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


def _first_in_row(codes: np.ndarray) -> np.ndarray:
    """[n, m] True where a code is the first of its value in its row (duplicates later in the row: False)."""
    order = np.argsort(codes, axis=1, kind="stable")
    ranked = np.take_along_axis(codes, order, axis=1)
    first_sorted = np.ones(codes.shape, bool)
    first_sorted[:, 1:] = ranked[:, 1:] != ranked[:, :-1]
    out = np.empty(codes.shape, bool)
    np.put_along_axis(out, order, first_sorted, axis=1)
    return out


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
