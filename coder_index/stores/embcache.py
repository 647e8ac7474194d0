"""Image embeddings cached on disk, keyed by the file's identity and the model's weights, so that
changing methods or texts never re-encodes images.

A file is trusted by ``core.file_identity``: real path, device, inode, size, modification and
status-change times. A file rewritten in place (even with its size and modification time put
back), replaced by a rename or touched is a miss, and so is another model; a file changed in the
last seconds (racy) is neither read from nor stored in the cache. The identity is taken before the
image is read, and stored with the embedding made from that read.

Entries of coder-index 0.3 and earlier (table ``image_embeddings``, keyed by path, size and
modification time only) are never read: they are simply misses.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sqlalchemy import BigInteger, Column, LargeBinary, MetaData, String, Table, Text, insert, select, tuple_

from coder_index.core.atomic import cache_dir, translate_disk_full
from coder_index.core.file_identity import FileIdentity, identify
from coder_index.stores.schema import make_engine

_meta = MetaData()
image_embeddings = Table(
    "image_embeddings_v2", _meta,
    Column("path", Text, primary_key=True),          # the real path
    Column("model_sha", String(64), primary_key=True),
    Column("device", BigInteger, nullable=False),
    Column("inode", BigInteger, nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("mtime_ns", BigInteger, nullable=False),
    Column("ctime_ns", BigInteger, nullable=False),
    Column("vector", LargeBinary, nullable=False),  # float32 bytes
)


def image_embedding_key(weights_sha256: str, decode: str = "cpu") -> str:
    """The model part of a cache key: the weights, and the decoder when it is not the reference (the
    tensor decoder's pixels differ from the reference's by rounding: their embeddings are not mixed)."""
    return weights_sha256 if decode == "cpu" else f"{weights_sha256}+decode-{decode}"


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

    def lookup(self, paths: Sequence[str | Path]) -> tuple[np.ndarray, np.ndarray, list[FileIdentity | None]]:
        """(hit mask [N], vectors [N, D], the files' identities now). Rows of misses are zeros; pass the
        identities of the misses to ``store`` with their embeddings (None: racy or unreadable, never
        stored)."""
        idents = [identify(p) for p in paths]
        keys = sorted({i.path for i in idents if i is not None})
        found: dict[str, tuple] = {}
        t = image_embeddings
        with self.engine.connect() as conn:
            for s in range(0, len(keys), 500):
                q = select(t.c.path, t.c.device, t.c.inode, t.c.size, t.c.mtime_ns, t.c.ctime_ns, t.c.vector).where(
                    tuple_(t.c.path, t.c.model_sha).in_([(k, self.model_sha) for k in keys[s:s + 500]]))
                found.update({r[0]: tuple(r) for r in conn.execute(q)})
        hit = np.zeros(len(idents), bool)
        out = np.zeros((len(idents), self.dim), np.float32)
        for n, ident in enumerate(idents):
            row = found.get(ident.path) if ident is not None else None
            if row is not None and tuple(row[:6]) == ident.as_tuple():
                hit[n] = True
                out[n] = np.frombuffer(row[6], dtype=np.float32)
        return hit, out, idents

    def store(self, identities: Sequence[FileIdentity | None], vectors: np.ndarray) -> int:
        """Keep each vector under the identity its file had before it was read; returns how many
        were kept (racy files, with no identity, are not)."""
        rows = [{"path": i.path, "model_sha": self.model_sha, "device": i.device, "inode": i.inode, "size": i.size,
                 "mtime_ns": i.mtime_ns, "ctime_ns": i.ctime_ns,
                 "vector": np.ascontiguousarray(v, dtype=np.float32).tobytes()}
                for i, v in zip(identities, vectors, strict=True) if i is not None]
        with translate_disk_full(self.path), self.engine.begin() as conn:
            for s in range(0, len(rows), 1000):
                conn.execute(insert(image_embeddings).prefix_with("OR REPLACE"), rows[s:s + 1000])
        return len(rows)
