"""Text embeddings remembered per model weights, so that no text is encoded twice by the same weights.

Text encoding is the slow part of building an index on a CPU (minutes per 10,000 texts). A rebuild
(``--overwrite``), a second index over the same vocabulary, or the same descriptors under another
class list cost only their new texts: every embedding is kept in ``CACHE_DIR/text-embeddings.sqlite``
under the weights that made it (the model's fingerprint, the same rule as for images and weights:
the weights' sha256, never a name) and the precision they ran in, and the text's sha256.

The cache is advisory: a cache that cannot be opened, read or written (a read-only home, a full
disk, a damaged file) means encoding as without it, with one debug line, never an error. A value
read back equals a fresh encoding within float rounding (the batch it was computed in may differ:
tested at 1e-5).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import Column, LargeBinary, MetaData, String, Table, insert, select, tuple_

from coder_index.core.atomic import cache_dir

log = logging.getLogger(__name__)

_meta = MetaData()
text_embeddings = Table(
    "text_embeddings_v2", _meta,  # v1 (coder-index 0.3: prompts only, keyed by text and weights) is not read
    Column("model_key", String(96), primary_key=True),   # weights sha256 / precision
    Column("text_sha", String(64), primary_key=True),    # sha256 of the UTF-8 text
    Column("vector", LargeBinary, nullable=False),       # float32 bytes, L2-normalised
)


def default_text_cache() -> Path:
    return cache_dir() / "text-embeddings.sqlite"


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass
class TextEncodeStats:
    """What encoding cost across calls: texts encoded by the model, texts read from the cache, and
    the seconds spent on both (what a rebuild saves)."""

    encoded: int = 0
    from_cache: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


class TextEmbeddingCache:
    """``encode(texts, encode_fn)``: cached embeddings of ``texts`` for one model (``model_key``), the
    misses encoded by ``encode_fn`` and kept."""

    def __init__(self, model_key: str, dim: int, path: str | Path | None = None) -> None:
        self.model_key, self.dim = model_key, dim
        self.path = Path(path) if path else default_text_cache()
        self.stats = TextEncodeStats()
        self._engine = None
        self._broken = False

    def _db(self):  # noqa: ANN202 - a SQLAlchemy Engine, or None when the cache cannot be used
        if self._engine is None and not self._broken:
            from coder_index.stores.schema import make_engine

            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                engine = make_engine(self.path, synchronous="NORMAL")
                _meta.create_all(engine)
                self._engine = engine
            except Exception as exc:  # advisory: encode as without it
                self._give_up("open", exc)
        return self._engine

    def _give_up(self, what: str, exc: BaseException) -> None:
        self._broken = True
        log.debug("text embedding cache %s not used (%s: %s)", self.path, what, exc)

    def lookup(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(hit mask [N], vectors [N, D]; zeros where missed)."""
        hit = np.zeros(len(texts), bool)
        out = np.zeros((len(texts), self.dim), np.float32)
        db = self._db()
        if db is None or not texts:
            return hit, out
        keys = [text_key(t) for t in texts]
        found: dict[str, bytes] = {}
        t = text_embeddings
        try:
            with db.connect() as conn:
                distinct = list(dict.fromkeys(keys))
                for s in range(0, len(distinct), 500):
                    q = select(t.c.text_sha, t.c.vector).where(
                        tuple_(t.c.model_key, t.c.text_sha).in_([(self.model_key, k) for k in distinct[s:s + 500]]))
                    found.update({r[0]: r[1] for r in conn.execute(q)})
        except Exception as exc:
            self._give_up("read", exc)
            return hit, out
        width = 4 * self.dim
        for n, k in enumerate(keys):
            blob = found.get(k)
            if blob is not None and len(blob) == width:  # a damaged entry is a miss
                hit[n] = True
                out[n] = np.frombuffer(blob, dtype=np.float32)
        return hit, out

    def store(self, texts: Sequence[str], vectors: np.ndarray) -> None:
        db = self._db()
        if db is None or not len(texts):
            return
        rows = [{"model_key": self.model_key, "text_sha": text_key(t),
                 "vector": np.ascontiguousarray(v, dtype=np.float32).tobytes()} for t, v in zip(texts, vectors,
                                                                                              strict=True)]
        try:
            with db.begin() as conn:
                for s in range(0, len(rows), 1000):
                    conn.execute(insert(text_embeddings).prefix_with("OR REPLACE"), rows[s:s + 1000])
        except Exception as exc:  # a full disk or a read-only cache: the embeddings are still returned
            self._give_up("write", exc)

    def encode(self, texts: Sequence[str], encode_fn: Callable[[list[str]], np.ndarray], *, chunk: int = 8192,
               started: Callable[[int], None] | None = None) -> np.ndarray:
        """Embeddings [N, D] of ``texts`` in order: cached ones read, the rest encoded by ``encode_fn``
        (given only the misses, each once, ``chunk`` at a time, each chunk kept as soon as it is
        encoded: an interrupted run keeps what it did). ``started(n)`` is told how many will be
        encoded, before the first."""
        import time

        t0 = time.perf_counter()
        texts = list(texts)
        hit, out = self.lookup(texts)
        missing = list(dict.fromkeys(t for t, h in zip(texts, hit, strict=True) if not h))
        if started is not None:
            started(len(missing))
        if missing:
            fresh = np.empty((len(missing), self.dim), np.float32)
            for s in range(0, len(missing), chunk):
                part = missing[s:s + chunk]
                fresh[s:s + len(part)] = np.asarray(encode_fn(part), dtype=np.float32)
                self.store(part, fresh[s:s + len(part)])
            row = {t: i for i, t in enumerate(missing)}
            out[~hit] = fresh[[row[t] for t, h in zip(texts, hit, strict=True) if not h]]
        self.stats.encoded += len(missing)
        self.stats.from_cache += int(hit.sum())
        self.stats.seconds += time.perf_counter() - t0
        return out


def model_key(weights_sha256: str, precision: str) -> str:
    """The cache's name of the weights that encode: their sha256 and the precision they run in."""
    return f"{weights_sha256}/{precision}"
