"""``TextIndex``: the text store with the methods attached, the public entry point.

``TextIndex.open(path)`` / ``TextIndex.create(path, encoder)`` give a ``stores.TextStore`` (all the
storage: texts, embeddings, search, the write protocol) that can also classify, explain and find
the texts nearest an image. The store never imports the methods; this class brings the two together
from above.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from coder_index.methods.coder import CoderClassifier
from coder_index.methods.explain import explain
from coder_index.methods.predict import Predictions, coder_classifier, embed_images
from coder_index.stores import pairs as pair_store
from coder_index.stores.pairs import PairTable
from coder_index.stores.text_index import TextStore


class TextIndex(TextStore):
    """A text index and what can be asked of it (see ``TextStore`` for the storage)."""

    # ----------------------------------------------------------------- prediction
    def classifier(self) -> CoderClassifier:
        """The CODER stage-1 classifier over the general texts, built once per open index."""
        return coder_classifier(self)

    def classify(self, images: Any, *, batch_size: int = 64) -> Predictions:
        """CODER zero-shot predictions for paths, PIL images, a preprocessed tensor or embeddings."""
        emb = embed_images(self, images, batch_size)
        return Predictions(self.class_names(), self.classifier().logits(emb))

    def nearest_texts(self, images: Any, k: int = 10) -> list[list[dict[str, Any]]]:
        """The k texts nearest to each image: text, class, kind, cosine; best first."""
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
        """Why each image gets its class from ``scorer`` (default CODER): see ``methods.explain``."""
        return explain(self, embed_images(self, images), k, scorer=scorer)

    # ----------------------------------------------------------------- pair texts (rerank)
    def add_pair_texts(self, features: dict[tuple[str, str], list[str]], source: str = "llm") -> int:
        """Store one-to-one features per ordered pair of class names as pair texts."""
        return pair_store.add_pair_texts(self, features, source)

    def pairs_with_texts(self, pairs: Iterable[tuple[int, int]]) -> set[tuple[int, int]]:
        return pair_store.pairs_with_texts(self, pairs)

    def pair_embeddings(self, pairs: Iterable[tuple[int, int]]) -> dict[tuple[int, int], np.ndarray]:
        return pair_store.pair_embeddings(self, pairs)

    def pair_table(self, pairs: Iterable[tuple[int, int]]) -> PairTable:
        """The rerank's table of difference vectors for these ordered pairs, built from arrays."""
        return pair_store.pair_table(self, pairs)
