"""Image embeddings cached on disk, keyed by (file, size, mtime, model weights), so that changing
methods or texts never re-encodes images. A changed file or another model is a cache miss."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sqlalchemy import Column, Integer, LargeBinary, MetaData, String, Table, Text, insert, select, tuple_

from coder_index.core.atomic import cache_dir, translate_disk_full
from coder_index.stores.schema import make_engine

_meta = MetaData()
image_embeddings = Table(
    "image_embeddings", _meta,
    Column("path", Text, primary_key=True),
    Column("model_sha", String(64), primary_key=True),
    Column("size", Integer, nullable=False),
    Column("mtime_ns", Integer, nullable=False),
    Column("vector", LargeBinary, nullable=False),  # float32 bytes
)


def default_embedding_cache() -> Path:
    return cache_dir() / "image-embeddings.sqlite"


class EmbeddingCache:
    def __init__(self, path: str | Path | None, model_sha: str, dim: int) -> None:
        self.path = Path(path) if path else default_embedding_cache()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.engine = make_engine(self.path, synchronous="NORMAL")
        with translate_disk_full(self.path):
            _meta.create_all(self.engine)
        self.model_sha = model_sha
        self.dim = dim

    @staticmethod
    def _stamp(path: Path) -> tuple[str, int, int]:
        st = path.stat()
        return str(path.resolve()), st.st_size, st.st_mtime_ns

    def lookup(self, paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
        """(hit mask [N], vectors [N, D]); rows of misses are zeros."""
        stamps = [self._stamp(p) for p in paths]
        found: dict[str, tuple[int, int, bytes]] = {}
        t = image_embeddings
        keys = [s[0] for s in stamps]
        with self.engine.connect() as conn:
            for i in range(0, len(keys), 500):
                q = select(t.c.path, t.c.size, t.c.mtime_ns, t.c.vector).where(
                    tuple_(t.c.path, t.c.model_sha).in_([(k, self.model_sha) for k in keys[i:i + 500]]))
                found.update({r[0]: (r[1], r[2], r[3]) for r in conn.execute(q)})
        hit = np.zeros(len(paths), bool)
        out = np.zeros((len(paths), self.dim), np.float32)
        for n, (key, size, mtime) in enumerate(stamps):
            row = found.get(key)
            if row is not None and row[0] == size and row[1] == mtime:
                hit[n] = True
                out[n] = np.frombuffer(row[2], dtype=np.float32)
        return hit, out

    def store(self, paths: list[Path], vectors: np.ndarray) -> None:
        rows = []
        for p, v in zip(paths, vectors, strict=True):
            key, size, mtime = self._stamp(p)
            rows.append({"path": key, "model_sha": self.model_sha, "size": size, "mtime_ns": mtime,
                         "vector": np.ascontiguousarray(v, dtype=np.float32).tobytes()})
        with translate_disk_full(self.path), self.engine.begin() as conn:
            for i in range(0, len(rows), 1000):
                conn.execute(insert(image_embeddings).prefix_with("OR REPLACE"), rows[i:i + 1000])
