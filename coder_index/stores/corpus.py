"""A local image-text corpus for X-MoRe retrieval.

    CORPUS_DIR/
      manifest.json   format, CLIP model fingerprint, dim, FAISS factory string, rows, sources
      corpus.faiss    corpus image embeddings (inner product; FAISS labels = row numbers)
      captions.npy    [rows, D] float32 L2-normalised embeddings of "a photo of a {caption}",
                      row-aligned, encoded once at ingest and memory-mapped at query time
      meta.sqlite     rows(id = row number, caption, source)
      calibration.json  X-MoRe's normalisers per (index texts, method, K): the mean confidences of both
                      modalities over a fixed sample of the corpus's own images, kept when first
                      computed (a corpus that cannot be written computes them again, the same)

A corpus is built aside and renamed into place, after every input was validated: a failed ingest
leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np
from sqlalchemy import Column, Integer, MetaData, Table, Text, func, insert, select

from coder_index.core.atomic import staged_directory
from coder_index.core.damage import read_manifest, reading
from coder_index.core.errors import IndexFormatError, InputFormatError
from coder_index.core.faults import crash_point
from coder_index.stores.corpus_base import (  # noqa: F401 - re-exported: the corpus's public names
    CALIBRATION_FILE,
    CAPTION_TEMPLATE,
    FORMAT,
    CorpusBase,
    keep_nprobe,
    normalize_rows,
)
from coder_index.stores.schema import make_engine

if TYPE_CHECKING:
    from coder_index.model.encoder import ClipEncoder, ModelFingerprint

_meta = MetaData()
corpus_rows = Table(
    "rows", _meta,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("caption", Text, nullable=False),
    Column("source", Text, nullable=True),
    # where the image came from, when the input says (LAION parquet columns, img2dataset .json sidecars)
    Column("url", Text, nullable=True),
    Column("key", Text, nullable=True),
    Column("image_path", Text, nullable=True),
)
TRACE_COLUMNS = ("url", "key", "image_path")


@dataclass
class Chunk:
    image_emb: np.ndarray     # [n, D], any scale
    captions: list[str]
    sources: list[str]
    caption_emb: np.ndarray | None = None  # precomputed caption embeddings, if used
    trace: list[dict[str, str | None]] | None = None  # url / key / image_path per row, where known


# ---------------------------------------------------------------------------------- sources
def laion_shards(root: Path) -> list[tuple[Path, Path]]:
    """(img_emb_N.npy, metadata_N.parquet) pairs of a clip-retrieval / LAION embedding folder."""
    emb_dir, meta_dir = root / "img_emb", root / "metadata"
    if not emb_dir.is_dir() or not meta_dir.is_dir():
        raise InputFormatError(f"{root} must hold img_emb/img_emb_*.npy and metadata/metadata_*.parquet "
                               "(the layout clip-retrieval and LAION publish)")
    num = re.compile(r"_(\d+)\.(npy|parquet)$")
    embs = {int(m.group(1)): p for p in emb_dir.glob("img_emb_*.npy") if (m := num.search(p.name))}
    metas = {int(m.group(1)): p for p in meta_dir.glob("metadata_*.parquet") if (m := num.search(p.name))}
    if not embs:
        raise InputFormatError(f"{emb_dir} has no img_emb_*.npy shards")
    unpaired = sorted(set(embs) ^ set(metas))
    if unpaired:
        raise InputFormatError(f"shards without their pair (img_emb or metadata missing): {unpaired[:5]}")
    return [(embs[k], metas[k]) for k in sorted(embs)]


def validate_laion(shards: list[tuple[Path, Path]], dim: int) -> int:
    """Check every shard before anything is written; returns the total row count."""
    import pyarrow.parquet as pq

    total = 0
    for emb_path, meta_path in shards:
        arr = np.load(emb_path, mmap_mode="r", allow_pickle=False)
        if arr.ndim != 2 or arr.shape[1] != dim:
            raise InputFormatError(f"{emb_path.name}: embeddings of shape {arr.shape}, expected [rows, {dim}] "
                                   "for this CLIP model")
        meta = pq.ParquetFile(meta_path)
        if "caption" not in meta.schema_arrow.names:
            raise InputFormatError(f"{meta_path.name} has no 'caption' column (columns: {meta.schema_arrow.names})")
        if meta.metadata.num_rows != arr.shape[0]:
            raise InputFormatError(f"{meta_path.name} has {meta.metadata.num_rows} rows but {emb_path.name} "
                                   f"{arr.shape[0]}: the shards are not row-aligned")
        captions = pq.read_table(meta_path, columns=["caption"]).column("caption")
        if captions.null_count:
            first = int(np.flatnonzero(captions.is_null().to_numpy(zero_copy_only=False))[0])
            raise InputFormatError(f"{meta_path.name}: {captions.null_count} row(s) without a caption "
                                   f"(first: row {first}); fix or drop them before ingesting")
        total += arr.shape[0]
    return total


def text_shard(emb_path: Path) -> Path:
    """text_emb/text_emb_N.npy beside img_emb/img_emb_N.npy."""
    return emb_path.parent.parent / "text_emb" / emb_path.name.replace("img_emb", "text_emb")


def validate_text_shards(shards: list[tuple[Path, Path]], dim: int) -> None:
    for emb_path, _ in shards:
        t = text_shard(emb_path)
        if not t.is_file():
            raise InputFormatError(f"--use-text-embeddings: {t} is missing")
        img = np.load(emb_path, mmap_mode="r", allow_pickle=False)
        txt = np.load(t, mmap_mode="r", allow_pickle=False)
        if txt.shape != img.shape or txt.shape[1] != dim:
            raise InputFormatError(f"{t.name} has shape {txt.shape}, {emb_path.name} {img.shape}: not row-aligned")


def laion_chunks(shards: list[tuple[Path, Path]], chunk: int, use_text_embeddings: bool = False) -> Iterator[Chunk]:
    import pyarrow.parquet as pq

    for emb_path, meta_path in shards:
        arr = np.load(emb_path, mmap_mode="r", allow_pickle=False)  # streamed, never fully in RAM
        txt = np.load(text_shard(emb_path), mmap_mode="r", allow_pickle=False) if use_text_embeddings else None
        names = pq.ParquetFile(meta_path).schema_arrow.names
        keep = [c for c in TRACE_COLUMNS if c in names]
        table = pq.read_table(meta_path, columns=["caption", *keep])
        captions = table.column("caption").to_pylist()
        trace = {c: [None if v is None else str(v) for v in table.column(c).to_pylist()] for c in keep}
        for s in range(0, arr.shape[0], chunk):
            stop = min(s + chunk, arr.shape[0])
            yield Chunk(np.asarray(arr[s:stop]), captions[s:stop],
                        [f"{emb_path.name}:{i}" for i in range(s, stop)],
                        normalize_rows(np.asarray(txt[s:stop])) if txt is not None else None,
                        [{c: trace[c][i] for c in keep} for i in range(s, stop)] if keep else None)


# ---------------------------------------------------------------------------------- building
def _train_sample(index: faiss.Index, sample: np.ndarray) -> None:
    if not index.is_trained:
        index.train(normalize_rows(sample))


def build_corpus(out: str | Path, encoder: ClipEncoder, chunks: Iterator[Chunk], total: int | None, *,
                 factory: str = "Flat", nprobe: int | None = None, train_sample: np.ndarray | None = None,
                 sources: dict[str, Any],
                 progress: bool = False, caption_batch: int = 256, caption_template: str = CAPTION_TEMPLATE,
                 encode: Callable[[list[str]], np.ndarray] | None = None) -> dict[str, Any]:
    """Stream chunks into a new corpus directory (built aside, renamed into place). ``total``: the rows
    to expect (None when a stream does not say: the caption embeddings are appended, then laid out)."""
    from tqdm import tqdm

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise IndexFormatError(f"{out} exists and is not empty; choose a new corpus directory")
    dim = encoder.embed_dim
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise InputFormatError(f"invalid --index-factory {factory!r}: {exc}") from None
    if not index.is_trained and train_sample is None:
        raise InputFormatError(f"factory {factory!r} needs training data")
    t0 = time.perf_counter()
    with staged_directory(out) as tmp:
        if train_sample is not None:
            _train_sample(index, train_sample)
        appended = None
        if total is None:
            appended = open(tmp / "captions.f32", "wb")  # noqa: SIM115 - closed below, the dir is discarded on failure
            captions_arr = None
        else:
            captions_arr = np.lib.format.open_memmap(tmp / "captions.npy", mode="w+", dtype=np.float32,
                                                     shape=(total, dim))
        engine = make_engine(tmp / "meta.sqlite", synchronous="OFF")  # the whole dir is discarded on failure
        _meta.create_all(engine)
        row = 0
        with tqdm(total=total, unit="row", desc="ingesting corpus rows (image + caption)", disable=not progress) \
                as bar, engine.begin() as conn:
            for ch in chunks:
                n = len(ch.captions)
                if n == 0:
                    continue
                index.add(normalize_rows(ch.image_emb))
                if ch.caption_emb is not None:
                    cap = ch.caption_emb
                else:
                    texts = [CAPTION_TEMPLATE.replace("{caption}", c.strip()) for c in ch.captions]
                    cap = encode(texts) if encode is not None else encoder.encode_texts(texts, batch_size=caption_batch)
                if appended is not None:
                    appended.write(np.ascontiguousarray(cap, dtype=np.float32).tobytes())
                else:
                    captions_arr[row:row + n] = cap
                trace = ch.trace or [{}] * n
                conn.execute(insert(corpus_rows), [{"id": row + i, "caption": c, "source": s,
                                                    **{k: t.get(k) for k in TRACE_COLUMNS}}
                                                   for i, (c, s, t) in enumerate(zip(ch.captions, ch.sources, trace,
                                                                                     strict=True))])
                row += n
                bar.update(n)
                crash_point("corpus.ingesting")
        if appended is not None:  # lay the appended rows out as captions.npy
            appended.close()
            raw = np.memmap(tmp / "captions.f32", dtype=np.float32, mode="r", shape=(row, dim)) if row else \
                np.zeros((0, dim), np.float32)
            laid = np.lib.format.open_memmap(tmp / "captions.npy", mode="w+", dtype=np.float32, shape=(row, dim))
            for s in range(0, row, 65536):
                laid[s:s + 65536] = raw[s:s + 65536]
            laid.flush()
            del laid, raw
            (tmp / "captions.f32").unlink()
            total = row
        else:
            captions_arr.flush()
            del captions_arr
        if row != total:  # e.g. undecodable images in a folder corpus: keep the aligned prefix
            arr = np.load(tmp / "captions.npy", mmap_mode="r")
            np.save(tmp / "captions.trim.npy", np.asarray(arr[:row]))
            del arr
            os.replace(tmp / "captions.trim.npy", tmp / "captions.npy")
        engine.dispose()
        keep_nprobe(index, nprobe)
        faiss.write_index(index, str(tmp / "corpus.faiss"))
        manifest = {"format": FORMAT, "version": 1, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "model": encoder.fingerprint.to_dict(), "dim": dim, "factory": factory, "rows": row,
                    "caption_template": caption_template, "sources": sources,
                    "ingest_seconds": round(time.perf_counter() - t0, 2)}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    return manifest


def open_corpus(path: str | Path, fingerprint: ModelFingerprint | None = None, *, device: Any = None) -> Any:
    """The corpus at ``path``: a local one (``Corpus``) or one by reference (``ReferenceCorpus``)."""
    return Corpus(path, fingerprint, device=device)


class Corpus(CorpusBase):
    """A corpus directory. ``Corpus(path)`` of a corpus by reference gives its ``ReferenceCorpus``, of a
    kNN service's URL its ``ServiceCorpus``."""

    def __new__(cls, path: str | Path, *args: Any, **kwargs: Any) -> Any:
        if cls is Corpus and str(path).startswith(("http://", "https://")):
            from coder_index.stores.corpus_service import ServiceCorpus

            return ServiceCorpus(str(path), *args, **kwargs)
        if cls is Corpus and _kind(Path(path)) == "reference":
            from coder_index.stores.corpus_reference import ReferenceCorpus

            return ReferenceCorpus(path, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, path: str | Path, fingerprint: ModelFingerprint | None = None, *,
                 device: Any = None) -> None:
        """``device``: a CUDA ``torch.device`` searches on that GPU where FAISS can (``faiss_gpu``)."""
        self.path = Path(path)
        self.device = device
        self._searcher: Any = None
        fix = "build the corpus again with `coder-index corpus build` into a new directory"
        if (self.path / "texts.faiss").exists() and not (self.path / "corpus.faiss").exists():
            raise IndexFormatError(f"{self.path} is a text index, not an image-text corpus: pass it as --index")
        self.manifest = read_manifest(self.path, FORMAT, ("model", "rows", "factory", "dim"),
                                      "a coder-index image-text corpus", fix)
        if fingerprint is not None:
            self.check_model(fingerprint)
        with reading(self.path, "corpus.faiss", fix):
            self.index = faiss.read_index(str(self.path / "corpus.faiss"))
        with reading(self.path, "captions.npy", fix):
            self.caption_vectors = np.load(self.path / "captions.npy", mmap_mode="r", allow_pickle=False)
        with reading(self.path, "meta.sqlite", fix):
            if not (self.path / "meta.sqlite").is_file():
                raise FileNotFoundError("no such file")
            self.engine = make_engine(self.path / "meta.sqlite", read_only=True)
            with self.engine.connect() as conn:
                n_rows = conn.execute(select(func.count()).select_from(corpus_rows)).scalar()
                last = conn.execute(select(corpus_rows.c.id).order_by(corpus_rows.c.id.desc()).limit(1)).scalar()
        if n_rows != self.manifest["rows"] or (n_rows and last != n_rows - 1):
            raise IndexFormatError(f"{self.path / 'meta.sqlite'} holds {n_rows} caption rows, the manifest "
                                   f"{self.manifest['rows']}; it is damaged; {fix}")
        if self.index.ntotal != self.caption_vectors.shape[0] or self.index.ntotal != self.manifest["rows"] or \
                self.index.d != self.manifest["dim"] or self.caption_vectors.ndim != 2 or \
                self.caption_vectors.shape[1] != self.manifest["dim"]:
            raise IndexFormatError(f"{self.path}: corpus.faiss ({self.index.ntotal} x {self.index.d}), captions.npy "
                                   f"{tuple(self.caption_vectors.shape)} and the manifest ({self.manifest['rows']} "
                                   f"rows) disagree; {fix}")

    def caption_embeddings(self, ids: np.ndarray, encode: Any = None) -> np.ndarray:
        """[N, k, D] prompted-caption embeddings of the retrieved rows (-1 ids, if any, give zeros),
        encoded at ingest (``encode`` is for corpora that encode them when retrieved)."""
        safe = np.where(ids < 0, 0, ids)
        order = np.argsort(safe, axis=None)  # sorted reads are kinder to a memory-mapped file
        flat = np.empty((safe.size, self.caption_vectors.shape[1]), np.float32)
        flat[order] = self.caption_vectors[safe.ravel()[order]]
        flat[(ids < 0).ravel()] = 0
        return flat.reshape(*ids.shape, -1)

    # ------------------------------------------------------------------ calibration
    def sample_images(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, [n, D] float32 image embeddings) of a fixed, seeded sample of the corpus's own images
        (all of them when it holds fewer)."""
        total = int(self.index.ntotal)
        rows = np.sort(np.random.default_rng(seed).choice(total, min(n, total), replace=False)).astype(np.int64)
        try:
            vectors = self.index.reconstruct_batch(rows)
        except RuntimeError:  # an IVF index reconstructs through its direct map
            ivf = faiss.try_extract_index_ivf(self.index)
            if ivf is None:
                raise
            ivf.make_direct_map()
            vectors = self.index.reconstruct_batch(rows)
        return rows, np.asarray(vectors, np.float32)

    def rows(self, ids: list[int]) -> dict[int, dict[str, Any]]:
        """Caption, source and, where the input had them, url / key / image_path of each row."""
        with self.engine.connect() as conn:
            present = {r[1] for r in conn.exec_driver_sql("PRAGMA table_info(rows)")}  # older corpora lack some
            cols = [c for c in corpus_rows.c if c.name in present]
            q = select(*cols).where(corpus_rows.c.id.in_([int(i) for i in ids]))
            return {r.id: {k: v for k, v in r._mapping.items() if k != "id" and v is not None} for r in conn.execute(q)}

    def captions(self, ids: np.ndarray) -> list[str]:
        """The captions of rows ``ids`` (flattened, in order)."""
        flat = [int(i) for i in np.asarray(ids, np.int64).ravel()]
        with self.engine.connect() as conn:
            found = dict(conn.execute(select(corpus_rows.c.id, corpus_rows.c.caption)
                                      .where(corpus_rows.c.id.in_(sorted(set(flat))))).all())
        return [found[i] for i in flat]

    def close(self) -> None:
        self.engine.dispose()


def _kind(path: Path) -> str | None:
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest.get("kind") if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None
