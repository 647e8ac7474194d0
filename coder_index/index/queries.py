"""Prediction and pair-text methods of ``TextIndex``, kept apart from its storage code."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np


class IndexQueries:
    """Mixed into ``TextIndex``: uses its encoder, text tables and FAISS search."""

    # ----------------------------------------------------------------- prediction
    @property
    def compute_device(self):  # -> torch.device
        """Where the per-image numeric work runs: the encoder's device (or the one it will load on)."""
        if self._encoder is not None:
            return self._encoder.device
        from ..compute import resolve_device

        return resolve_device(self._device)

    def classifier(self):  # -> CoderClassifier (import kept local: predict imports this module)
        """The CODER stage-1 classifier over the general texts, built once per open index."""
        if "classifier" not in self._cache:
            from ..predict import zero_shot_classifier

            self._cache["classifier"] = zero_shot_classifier(self)
        return self._cache["classifier"]

    def classify(self, images: Any, *, batch_size: int = 64):  # -> Predictions
        """CODER zero-shot predictions for paths, PIL images, a preprocessed tensor or embeddings."""
        from ..predict import Predictions, embed_images

        emb = embed_images(self, images, batch_size)
        return Predictions(self.class_names(), self.classifier().logits(emb))

    def nearest_texts(self, images: Any, k: int = 10) -> list[list[dict[str, Any]]]:
        """The k texts nearest to each image: text, class, kind, cosine; best first."""
        from ..predict import embed_images

        emb = embed_images(self, images)
        cos, ids = self.search_texts(emb, k)
        meta = self.texts_by_id({int(i) for i in ids.ravel() if i >= 0})
        return [[{"text": meta[int(i)]["text"], "class": meta[int(i)]["class"], "kind": meta[int(i)]["kind"],
                  "cosine": float(c)} for c, i in zip(cr, ir, strict=True) if i >= 0]
                for cr, ir in zip(cos, ids, strict=True)]

    def texts_near(self, query: str, k: int = 10) -> list[dict[str, Any]]:
        """The k texts nearest to a text query (its CLIP text embedding): text, class, kind, cosine."""
        if not isinstance(query, str) or not query.strip():
            raise ValueError("the text query is empty; give a few words, e.g. 'a fluffy white dog'")
        return self.nearest_texts(self.encoder.encode_texts([query.strip()]), k)[0]

    def explain(self, images: Any, k: int = 10, scorer: Any = None) -> list[dict[str, Any]]:
        """Why each image gets its class from ``scorer`` (default CODER): see ``predict.explain``."""
        from ..predict import embed_images, explain

        return explain(self, embed_images(self, images), k, scorer=scorer)

    # ----------------------------------------------------------------- pair texts (rerank)
    def add_pair_texts(self, features: dict[tuple[str, str], list[str]], source: str = "llm") -> int:
        """Store one-to-one features per ordered pair of class names as pair texts."""
        from .pairs import add_pair_texts

        return add_pair_texts(self, features, source)

    def pairs_with_texts(self, pairs: Iterable[tuple[int, int]]) -> set[tuple[int, int]]:
        from .pairs import pairs_with_texts

        return pairs_with_texts(self, pairs)

    def pair_embeddings(self, pairs: Iterable[tuple[int, int]]) -> dict[tuple[int, int], np.ndarray]:
        from .pairs import pair_embeddings

        return pair_embeddings(self, pairs)

    def pair_table(self, pairs: Iterable[tuple[int, int]]) -> Any:  # -> rerank.PairTable
        """The rerank's table of difference vectors for these ordered pairs, built from arrays."""
        from .pairs import pair_table

        return pair_table(self, pairs)
