"""Text embeddings of an index's model, through the text-embedding cache (``textcache``): what its
weights encoded before, in any index, is read back; the rest is encoded, with a progress bar over
what is really encoded. The store stores the vectors; this module gets them."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from coder_index.stores.textcache import TextEmbeddingCache, TextEncodeStats
from coder_index.stores.textcache import model_key as text_model_key

if TYPE_CHECKING:
    from coder_index.model.index_model import IndexModel

log = logging.getLogger(__name__)


class CachedTextEncoding:
    """The texts of one model (``model``: an ``IndexModel``), ``dim`` wide, cached per weights and
    precision. ``cache_path``: None for the default cache, False for none, or a file."""

    def __init__(self, model: IndexModel, dim: int) -> None:
        self.model, self.dim = model, dim
        self.cache_path: Any = None
        self._caches: dict[str, TextEmbeddingCache] = {}

    def cache(self, encode: Any = None, raw: bool = False) -> TextEmbeddingCache | None:
        """The cache of these weights in the precision that encodes (that of ``encode``, e.g. Ray's
        actors, when given); None when turned off or the precision is unknown. ``raw``: the cache of
        their unnormalised features (kept apart from the normalised ones)."""
        if self.cache_path is False:
            return None
        precision = getattr(encode, "precision", None) if encode is not None else self.model.precision_in_use()
        if precision is None:
            return None
        key = text_model_key(self.model.fingerprint.weights_sha256, precision) + ("/raw" if raw else "")
        if key not in self._caches:
            path = None if self.cache_path in (None, True) else self.cache_path
            self._caches[key] = TextEmbeddingCache(key, self.dim, path)
        return self._caches[key]

    def stats(self) -> TextEncodeStats:
        """Texts encoded and read from the cache so far (all precisions)."""
        out = TextEncodeStats()
        for cache in self._caches.values():
            out.encoded += cache.stats.encoded
            out.from_cache += cache.stats.from_cache
            out.seconds += cache.stats.seconds
        return out

    def encode(self, texts: list[str], *, batch_size: int | None = None, progress: bool = False,
               desc: str = "encoding texts", encode: Any = None, normalize: bool = True) -> np.ndarray:
        """Embeddings of ``texts``: read back from the cache, or encoded (by ``encode`` when given).
        ``normalize=False``: the raw features, encoded here (``encode`` makes normalised ones)."""
        if not normalize:
            encode = None
        from tqdm import tqdm

        bar = None

        def started(n: int) -> None:
            nonlocal bar
            if progress and n:
                if n > 2000 and encode is None and self.model.encoder.device.type == "cpu":
                    log.warning("%s: %d texts on the CPU: a few minutes per 10,000 texts with ViT-B-32 (a GPU is "
                                "far faster); each text is encoded once per model, and remembered. The progress "
                                "bar shows the time left.", desc, n)
                bar = tqdm(total=n, unit="text", desc=desc)

        def fresh(todo: list[str]) -> np.ndarray:
            if encode is not None:
                vecs = np.asarray(encode(todo), dtype=np.float32)
                if bar is not None:
                    bar.update(len(todo))
                return vecs
            return self.model.encoder.encode_texts(todo, batch_size=batch_size,
                                                   progress=bar.update if bar is not None else None,
                                                   normalize=normalize)

        cache = self.cache(encode, raw=not normalize)
        try:
            if cache is None:
                todo = list(texts)
                started(len(todo))
                return fresh(todo)
            return cache.encode(texts, fresh, started=started)
        finally:
            if bar is not None:
                bar.close()
