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
import torch
from sqlalchemy import select, tuple_

from coder_index.core.validation import as_float_matrix, l2_normalize, to_numpy
from coder_index.model.compute import on_device
from coder_index.stores import schema

if TYPE_CHECKING:
    from coder_index.stores.text_index import TextStore


def pairs_with_texts(index: TextStore, pairs: Iterable[tuple[int, int]]) -> set[tuple[int, int]]:
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


def add_pair_texts(index: TextStore, features: Mapping[tuple[str, str], list[str]], source: str,
                   batch_size: int | None = None) -> int:
    """Embed and store features per ordered pair of class names; returns how many texts were new."""
    from coder_index.stores.text_index import PAIR_VECTORS

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
    emb = index.encode_texts_cached(texts, batch_size=batch_size)
    at = {s: i for i, s in enumerate(texts)}
    with index.writing():
        rows = absent(rows)
        if rows:
            index.append_rows(PAIR_VECTORS, rows, emb[[at[r["text"]] for r in rows]])
            index.write_manifest_counts()
    index.forget("pair_vectors")
    return len(rows)


def _pair_rows(index: TextStore, pairs: Iterable[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ordered pairs [N, 2], vectors [N, D], in one array) of the texts of the requested pairs, a text
    of weight w repeated w times (it counts as often in the rerank's mean: released behaviour)."""
    from coder_index.stores.text_index import PAIR_VECTORS

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


def pair_table(index: TextStore, pairs: Iterable[tuple[int, int]]) -> PairTable:
    """The rerank's ``PairTable`` of the requested ordered pairs, built from arrays: the texts' pairs
    and vectors gathered by position from the memory-mapped pair matrix, no dict per pair."""

    keys, vectors, _ = _pair_rows(index, pairs)
    return PairTable.from_arrays(keys[:, 0], keys[:, 1], vectors, len(index.class_names())) if len(keys) else \
        PairTable({}, index.dim, len(index.class_names()))


def pair_embeddings(index: TextStore, pairs: Iterable[tuple[int, int]]) -> dict[tuple[int, int], np.ndarray]:
    """``{(a, b): [K_ab, D]}`` for the requested ordered pairs that have texts."""
    keys, _, pos = _pair_rows(index, pairs)
    if not len(keys):
        return {}
    from coder_index.stores.text_index import PAIR_VECTORS

    _, vectors = index.matrix(PAIR_VECTORS)
    grouping = np.lexsort((keys[:, 1], keys[:, 0]))
    keys, pos = keys[grouping], pos[grouping]
    bounds = np.flatnonzero(np.any(np.diff(keys, axis=0) != 0, axis=1)) + 1
    out = {}
    for seg_keys, seg_pos in zip(np.split(keys, bounds), np.split(pos, bounds), strict=True):
        out[(int(seg_keys[0, 0]), int(seg_keys[0, 1]))] = np.asarray(vectors[seg_pos])
    return out


def pair_text_rows(index: TextStore, pairs: Iterable[tuple[int, int]]
                   ) -> dict[tuple[int, int], tuple[list[dict[str, Any]], np.ndarray]]:
    """``{(a, b): ([{text, feature}, ...], [K_ab, D] vectors)}`` of the requested ordered pairs that
    have texts, each distinct text once (what an explanation shows; the rerank's means use
    ``pair_embeddings``, which repeats weighted texts)."""
    from coder_index.stores.text_index import PAIR_VECTORS

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


def _positions(index: TextStore, all_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Rows of the mapped pair matrix holding the vectors of ``ids`` (sorted once per generation)."""
    cached = index.derived("pair_order", lambda: (all_ids, np.argsort(all_ids)))
    if cached[0] is not all_ids:  # once per mapped generation
        index.forget("pair_order")
        cached = index.derived("pair_order", lambda: (all_ids, np.argsort(all_ids)))
    order = cached[1]
    return order[np.searchsorted(all_ids, ids, sorter=order)]


class PairTable:
    """Difference vectors of the unordered pairs that have texts in both directions.

    Built with array operations over all texts at once (one concatenation, one normalisation, one
    segment mean), not per pair: from a ``{(a, b): [K_ab, D]}`` mapping, or from arrays of the texts'
    ordered pairs and vectors (``from_arrays``, what the index gives without a dict per pair). The
    rerank looks pairs up as tensors on its device (``on``): a sorted key column and a gather.
    """

    def __init__(self, pair_texts: Mapping[tuple[int, int], Any], dim: int, n_classes: int) -> None:
        keys_a, keys_b, arrays = [], [], []
        for key, emb in pair_texts.items():
            if not (isinstance(key, tuple) and len(key) == 2):
                raise ValueError(f"pair_texts keys must be (a, b) class-id tuples, got {key!r}")
            arr = to_numpy(emb)
            if arr.size == 0:
                continue  # no texts for this direction: the pair contributes 0
            arr = arr.reshape(-1, arr.shape[-1]) if arr.ndim != 2 else arr
            if arr.shape[1] != dim:
                raise ValueError(f"pair_texts[{key!r}] has width {arr.shape[1]}, image_emb has {dim}")
            keys_a.append(key[0])
            keys_b.append(key[1])
            arrays.append(arr)
        a = np.asarray(keys_a, dtype=np.int64)
        b = np.asarray(keys_b, dtype=np.int64)
        counts = np.fromiter((len(x) for x in arrays), dtype=np.int64, count=len(arrays))
        texts = np.concatenate(arrays) if arrays else np.zeros((0, dim), np.float32)
        self._build(np.repeat(a, counts), np.repeat(b, counts), texts, dim, n_classes)

    @classmethod
    def from_arrays(cls, text_a: np.ndarray, text_b: np.ndarray, texts: np.ndarray, n_classes: int) -> PairTable:
        """The table of texts given as arrays: text i describes class ``text_a[i]`` as different from
        ``text_b[i]`` (a text of weight w appears w times)."""
        table = cls.__new__(cls)
        table._build(np.asarray(text_a, np.int64), np.asarray(text_b, np.int64), np.asarray(texts),
                     int(np.asarray(texts).shape[1]), n_classes)
        return table

    def _build(self, text_a: np.ndarray, text_b: np.ndarray, texts: np.ndarray, dim: int, n_classes: int) -> None:
        self.n_classes = n_classes
        self._device_copies: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        bad = (text_a < 0) | (text_a >= n_classes) | (text_b < 0) | (text_b >= n_classes) | (text_a == text_b)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"pair_texts key {(int(text_a[i]), int(text_b[i]))} must name two different classes "
                             f"in [0, {n_classes})")
        if len(texts) == 0:
            self.keys = np.zeros(0, np.int64)
            self.diff = np.zeros((0, dim), np.float32)
            return
        codes = text_a * n_classes + text_b
        ordered, segment = np.unique(codes, return_inverse=True)  # one segment per ordered pair, sorted
        counts = np.bincount(segment, minlength=len(ordered))
        texts = l2_normalize(as_float_matrix(texts, "pair_texts"), "pair_texts")
        # segment means with torch's index_add_ (multi-threaded; numpy's reduceat is ~20x slower here)
        sums = torch.zeros((len(ordered), dim), dtype=torch.float32).index_add_(
            0, torch.from_numpy(segment.astype(np.int64)), torch.from_numpy(texts))
        means = sums.numpy() / counts[:, None].astype(np.float32)
        a, b = ordered // n_classes, ordered % n_classes
        # keep unordered pairs {a, b} that have both directions: d = mean(T(lo,hi)) - mean(T(hi,lo))
        reverse = b * n_classes + a
        pos = np.clip(np.searchsorted(ordered, reverse), 0, len(ordered) - 1)
        has_both = ordered[pos] == reverse
        keep = has_both & (a < b)
        self.keys = ordered[keep]                       # sorted, as ``ordered`` is
        self.diff = np.ascontiguousarray((means[keep] - means[pos[keep]]).astype(np.float32))

    def lookup(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Row in ``diff`` for each (a, b), its sign (+1 if a < b, -1 otherwise) and validity."""
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        key = lo.astype(np.int64) * self.n_classes + hi
        if len(self.keys) == 0:
            return np.zeros_like(key), np.zeros(key.shape, np.float32), np.zeros(key.shape, bool)
        pos = np.clip(np.searchsorted(self.keys, key), 0, len(self.keys) - 1)
        valid = (self.keys[pos] == key) & (a != b)
        sign = np.where(a < b, 1.0, -1.0).astype(np.float32)
        return pos, sign, valid

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, diff) as tensors on ``device``, copied there once."""
        name = str(device)
        if name not in self._device_copies:
            self._device_copies[name] = (torch.from_numpy(self.keys).to(device), on_device(self.diff, device))
        return self._device_copies[name]

    def lookup_on(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``lookup`` on tensors, where they are: no class pair travels to the host."""
        keys, _ = self.on(a.device)
        lo, hi = torch.minimum(a, b), torch.maximum(a, b)
        key = lo * self.n_classes + hi
        if len(self.keys) == 0:
            zeros = torch.zeros_like(key)
            return zeros, zeros.float(), zeros.bool()
        pos = torch.searchsorted(keys, key).clamp_(max=len(self.keys) - 1)
        valid = (keys[pos] == key) & (a != b)
        sign = torch.where(a < b, 1.0, -1.0)
        return pos, sign, valid
