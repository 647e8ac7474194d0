"""One-to-one pair texts in an index: every pair template of the index's recipe (``Because of
{feature}, {a} is different from {b}`` by default; 7 templates for most datasets under cvpr24) for
every feature.

They live apart from the general texts (pairs.faiss + the pair_texts table) because CODER uses only
general texts; the rerank asks for the pairs that meet in some image's top-5, on demand.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import select, tuple_

from . import schema

if TYPE_CHECKING:
    from .text_index import TextIndex


def pairs_with_texts(index: TextIndex, pairs: Iterable[tuple[int, int]]) -> set[tuple[int, int]]:
    """Which of the ordered class-id pairs already have at least one text."""
    wanted = list(dict.fromkeys((int(a), int(b)) for a, b in pairs))
    t = schema.pair_texts
    have: set[tuple[int, int]] = set()
    with index.engine.connect() as conn:
        for i in range(0, len(wanted), 400):
            q = select(t.c.class_a, t.c.class_b).distinct().where(
                tuple_(t.c.class_a, t.c.class_b).in_(wanted[i:i + 400]))
            have.update((r[0], r[1]) for r in conn.execute(q))
    return have


def add_pair_texts(index: TextIndex, features: Mapping[tuple[str, str], list[str]], source: str,
                   batch_size: int | None = None) -> int:
    """Embed and store features per ordered pair of class names; returns how many texts were new."""
    from .text_index import PAIR_VECTORS

    ids = {n: i for i, n in enumerate(index.class_names())}
    unknown = sorted({n for p in features for n in p} - ids.keys())
    if unknown:
        raise ValueError(f"pair texts name classes that are not in the index: {unknown[:5]}")
    recipe = index.recipe
    rows = []
    for (a, b), feats in features.items():
        if a == b:
            continue
        for feature, text, weight in recipe.pair_texts(a, b, feats):
            rows.append({"class_a": ids[a], "class_b": ids[b], "feature": feature, "text": text,
                         "source": source, "weight": weight})
    if not rows:
        return 0
    t = schema.pair_texts

    def absent(rows: list[dict]) -> list[dict]:
        keys = list({(r["class_a"], r["class_b"]) for r in rows})
        present = set()
        with index.engine.connect() as conn:
            for i in range(0, len(keys), 400):
                q = select(t.c.class_a, t.c.class_b, t.c.text).where(
                    tuple_(t.c.class_a, t.c.class_b).in_(keys[i:i + 400]))
                present.update(tuple(r) for r in conn.execute(q))
        return [r for r in rows if (r["class_a"], r["class_b"], r["text"]) not in present]

    rows = absent(rows)
    if not rows:
        return 0
    texts = list(dict.fromkeys(r["text"] for r in rows))
    emb = index.encoder.encode_texts(texts, batch_size=batch_size)
    at = {s: i for i, s in enumerate(texts)}
    with index.writing():
        rows = absent(rows)
        if rows:
            index._atomic_add(PAIR_VECTORS, rows, emb[[at[r["text"]] for r in rows]])
            index._write_manifest_counts()
    index._cache.pop("pair_vectors", None)
    return len(rows)


def _pair_rows(index: TextIndex, pairs: Iterable[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ordered pairs [N, 2], vectors [N, D], in one array) of the texts of the requested pairs, a text
    of weight w repeated w times (it counts as often in the rerank's mean: released behaviour)."""
    from .text_index import PAIR_VECTORS

    wanted = list(dict.fromkeys((int(a), int(b)) for a, b in pairs))
    t = schema.pair_texts
    rows = []
    with index.engine.connect() as conn:  # one read transaction: rows and vectors of one generation
        all_ids, vectors = index.matrix(PAIR_VECTORS, conn)
        for i in range(0, len(wanted), 400):
            q = select(t.c.id, t.c.class_a, t.c.class_b, t.c.weight).where(
                tuple_(t.c.class_a, t.c.class_b).in_(wanted[i:i + 400]))
            rows += conn.execute(q).all()
        if not rows:
            return np.zeros((0, 2), np.int64), np.zeros((0, index.dim), np.float32), np.zeros(0, np.int64)
        table = np.array(rows, dtype=np.int64).reshape(-1, 4)
        pos = _positions(index, all_ids, table[:, 0])
        keys, weights = table[:, 1:3], table[:, 3]
        if (weights > 1).any():
            pos, keys = np.repeat(pos, weights), np.repeat(keys, weights, axis=0)
        return keys, np.asarray(vectors[pos]), pos


def pair_table(index: TextIndex, pairs: Iterable[tuple[int, int]]) -> Any:
    """The rerank's ``PairTable`` of the requested ordered pairs, built from arrays: the texts' pairs
    and vectors gathered by position from the memory-mapped pair matrix, no dict per pair."""
    from ..rerank import PairTable

    keys, vectors, _ = _pair_rows(index, pairs)
    return PairTable.from_arrays(keys[:, 0], keys[:, 1], vectors, len(index.class_names())) if len(keys) else \
        PairTable({}, index.dim, len(index.class_names()))


def pair_embeddings(index: TextIndex, pairs: Iterable[tuple[int, int]]) -> dict[tuple[int, int], np.ndarray]:
    """``{(a, b): [K_ab, D]}`` for the requested ordered pairs that have texts."""
    keys, _, pos = _pair_rows(index, pairs)
    if not len(keys):
        return {}
    from .text_index import PAIR_VECTORS

    _, vectors = index.matrix(PAIR_VECTORS)
    grouping = np.lexsort((keys[:, 1], keys[:, 0]))
    keys, pos = keys[grouping], pos[grouping]
    bounds = np.flatnonzero(np.any(np.diff(keys, axis=0) != 0, axis=1)) + 1
    out = {}
    for seg_keys, seg_pos in zip(np.split(keys, bounds), np.split(pos, bounds), strict=True):
        out[(int(seg_keys[0, 0]), int(seg_keys[0, 1]))] = np.asarray(vectors[seg_pos])
    return out


def pair_text_rows(index: TextIndex, pairs: Iterable[tuple[int, int]]
                   ) -> dict[tuple[int, int], tuple[list[dict[str, Any]], np.ndarray]]:
    """``{(a, b): ([{text, feature}, ...], [K_ab, D] vectors)}`` of the requested ordered pairs that
    have texts, each distinct text once (what an explanation shows; the rerank's means use
    ``pair_embeddings``, which repeats weighted texts)."""
    from .text_index import PAIR_VECTORS

    wanted = list(dict.fromkeys((int(a), int(b)) for a, b in pairs))
    t = schema.pair_texts
    rows = []
    with index.engine.connect() as conn:
        all_ids, vectors = index.matrix(PAIR_VECTORS, conn)
        for i in range(0, len(wanted), 400):
            q = select(t.c.id, t.c.class_a, t.c.class_b, t.c.text, t.c.feature).where(
                tuple_(t.c.class_a, t.c.class_b).in_(wanted[i:i + 400])).order_by(t.c.id)
            rows += conn.execute(q).all()
    if not rows:
        return {}
    pos = _positions(index, all_ids, np.array([r[0] for r in rows], dtype=np.int64))
    grouped: dict[tuple[int, int], list[int]] = {}
    for n, r in enumerate(rows):
        grouped.setdefault((int(r[1]), int(r[2])), []).append(n)
    return {key: ([{"text": rows[n][3], "feature": rows[n][4]} for n in members], np.asarray(vectors[pos[members]]))
            for key, members in grouped.items()}


def _positions(index: TextIndex, all_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Rows of the mapped pair matrix holding the vectors of ``ids`` (sorted once per generation)."""
    cached = index._cache.get("pair_order")
    if cached is None or cached[0] is not all_ids:  # once per mapped generation
        index._cache["pair_order"] = cached = (all_ids, np.argsort(all_ids))
    order = cached[1]
    return order[np.searchsorted(all_ids, ids, sorter=order)]
