"""An X-MoRe corpus that refers to an embedding folder instead of copying it (``corpus build --reference``).

    CORPUS_DIR/
      manifest.json     kind "reference": the model, the folder it refers to (every shard's size and
                        rows, a sample hash), the FAISS index it searches (path, size, sample hash)
      corpus.faiss      only when built here (``--index-factory``); else the user's index is named
      calibration.json  X-MoRe's normalisers, as for a local corpus

Nothing referred to is ever written to. On open, the folder and the index are checked against the
manifest (sizes, rows, a hash of sampled bytes): a changed or missing file is a clear error, never a
silent wrong neighbour. The index is memory-mapped read-only (as clip-retrieval's back-end does with
``enable_faiss_memory_mapping``); captions are read for the retrieved rows only (their parquet row
groups), and their prompted embeddings are encoded when first retrieved, through the text-embedding
cache (or read from ``text_emb`` with ``--use-text-embeddings``). After each search the index's
pages leave the process's resident memory (they stay in the page cache): a process holds the pages
of one batch's search, not the index, and its memory does not grow with the corpus's rows.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from coder_index.core.damage import read_manifest
from coder_index.core.errors import IndexFormatError, InputFormatError
from coder_index.core.pages import release_file_pages
from coder_index.stores.corpus_base import (
    CAPTION_TEMPLATE,
    FORMAT,
    CorpusBase,
    keep_nprobe,
    normalize_rows,
)
from coder_index.stores.embedding_folder import EmbeddingFolder, head_and_tail, shards_from

REFERENCE = "reference"
SEARCH_CHUNK = 64  # queries searched between two releases of the index's pages: a classify batch
LOCAL_INDEX = "corpus.faiss"
# How FAISS is asked to map an index, best first: IO_FLAG_MMAP_IFC maps flat codes, inverted lists and
# HNSW storage in place (FAISS >= 1.11); IO_FLAG_MMAP (what clip-retrieval's back-end passes) maps
# inverted lists only, and reads a flat index whole into memory.
MMAP_FLAGS = tuple(getattr(faiss, flag) | faiss.IO_FLAG_READ_ONLY for flag in ("IO_FLAG_MMAP_IFC", "IO_FLAG_MMAP")
                   if hasattr(faiss, flag))


def index_identity(path: Path) -> dict[str, Any]:
    """Size and a hash of the head and tail of a FAISS index file."""
    size = path.stat().st_size
    return {"size": size, "sample_sha256": hashlib.sha256(head_and_tail(open(path, "rb"), size)).hexdigest()}


def read_index_mapped(path: Path) -> faiss.Index:
    """The index, memory-mapped read-only where FAISS can (inverted lists, flat codes), else read."""
    for flags in MMAP_FLAGS:
        try:
            return faiss.read_index(str(path), flags)
        except RuntimeError:
            continue
    return faiss.read_index(str(path), faiss.IO_FLAG_READ_ONLY)


class ReferenceCorpus(CorpusBase):
    """A corpus by reference (see the module docstring)."""

    def __init__(self, path: str | Path, fingerprint: Any = None, *, device: Any = None,
                 manifest: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.device = device
        self._searcher: Any = None
        fix = ("build the corpus again (`coder-index corpus build NAME --embeddings DIR --reference`), or put "
               "back what it refers to")
        self.fix = fix
        self.manifest = manifest or read_manifest(self.path, FORMAT, ("model", "rows", "dim", "embeddings", "index"),
                                                  "a coder-index image-text corpus", fix)
        if fingerprint is not None:
            self.check_model(fingerprint)
        recorded = self.manifest["embeddings"]
        self.folder = EmbeddingFolder(recorded["root"], shards_from(recorded))
        self.folder.check(recorded, fix)
        info = self.manifest["index"]
        index_path = Path(info["path"])
        if not index_path.is_absolute():
            index_path = self.path / index_path
        self.index_path = index_path
        if not index_path.is_file():
            raise IndexFormatError(f"{index_path}, the FAISS index this corpus searches, is missing; {fix}")
        if index_identity(index_path) != {"size": info["size"], "sample_sha256": info["sample_sha256"]}:
            raise IndexFormatError(f"{index_path} changed since the corpus was built (its size or sampled bytes "
                                   f"differ); {fix}")
        try:
            self.index = read_index_mapped(index_path)
        except RuntimeError as exc:
            raise IndexFormatError(f"{index_path} is not a FAISS index FAISS can read ({str(exc).splitlines()[-1]})"
                                   f"; {fix}") from None
        check_index(self.index, self.folder.rows, self.folder.dim, index_path)
        self._mapped_path = os.path.realpath(index_path)  # as /proc/self/maps names it
        if self.manifest.get("nprobe"):
            self.set_nprobe(int(self.manifest["nprobe"]))
        self.use_text_embeddings = bool(self.manifest.get("use_text_embeddings"))
        self.caption_template = self.manifest.get("caption_template", CAPTION_TEMPLATE)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(self, image_emb: np.ndarray, k: int = 16) -> tuple[np.ndarray, np.ndarray]:
        """As a local corpus's, SEARCH_CHUNK queries at a time; after each chunk the index pages it read
        are dropped from the process's resident memory (they stay in the page cache): memory holds one
        chunk's pages, not the index, whatever the number of queries (a calibration's 1,000 too)."""
        image_emb = np.asarray(image_emb, np.float32)
        sims, ids = [], []
        for start in range(0, max(len(image_emb), 1), SEARCH_CHUNK):
            try:
                s, i = super().search(image_emb[start:start + SEARCH_CHUNK], k)
            finally:
                release_file_pages(self._mapped_path)
            sims.append(s)
            ids.append(i)
        return np.concatenate(sims), np.concatenate(ids)

    def captions(self, ids: np.ndarray) -> list[str]:
        return [str(c) for c in self.folder.column(np.asarray(ids, np.int64).ravel(), "caption")]

    def caption_embeddings(self, ids: np.ndarray, encode: Callable[[list[str]], np.ndarray] | None = None
                           ) -> np.ndarray:
        """[N, k, D] prompted-caption embeddings of the retrieved rows (-1 ids give zeros): the captions
        are read for these rows only and encoded by ``encode`` (the index's cached text encoder), or
        read from text_emb for a corpus built with --use-text-embeddings."""
        flat_ids = np.asarray(ids, np.int64).ravel()
        valid = flat_ids >= 0
        out = np.zeros((flat_ids.size, self.folder.dim), np.float32)
        if valid.any():
            unique, back = np.unique(flat_ids[valid], return_inverse=True)
            if self.use_text_embeddings:
                vecs = normalize_rows(self.folder.vectors(unique, "text"))
            else:
                if encode is None:
                    raise ValueError("a corpus by reference encodes its captions: pass encode")
                texts = [self.caption_template.replace("{caption}", c.strip()) for c in self.captions(unique)]
                vecs = np.asarray(encode(texts), np.float32)
            out[valid] = vecs[back]
        return out.reshape(*np.shape(ids), -1)

    def sample_images(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        total = self.ntotal
        rows = np.sort(np.random.default_rng(seed).choice(total, min(n, total), replace=False)).astype(np.int64)
        return rows, normalize_rows(self.folder.vectors(rows))  # normalised, as a local corpus's index gives them

    def rows(self, ids: list[int]) -> dict[int, dict[str, Any]]:
        ids_arr = np.asarray([int(i) for i in ids if 0 <= int(i) < self.ntotal], np.int64)
        if not len(ids_arr):
            return {}
        out: dict[int, dict[str, Any]] = {int(i): {} for i in ids_arr}
        for name in ("caption", "url", "key"):
            for i, v in zip(ids_arr, self.folder.column(ids_arr, name), strict=True):
                if v is not None:
                    out[int(i)][name] = str(v)
        which, local = self.folder.locate(ids_arr)
        for i, s, r in zip(ids_arr, which, local, strict=True):
            out[int(i)]["source"] = f"{Path(self.folder.shards[int(s)].emb).name}:{int(r)}"
        return out

    def close(self) -> None:
        self.folder.close()


def check_index(index: faiss.Index, rows: int, dim: int, where: Any) -> None:
    if index.d != dim:
        raise InputFormatError(f"{where}: the FAISS index holds {index.d}-wide vectors, the embeddings {dim}")
    if index.ntotal != rows:
        raise InputFormatError(f"{where}: the FAISS index holds {index.ntotal} vectors, the embedding folder {rows} "
                               "rows: its ids must be the folder's rows, in order (as autofaiss numbers them)")
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise InputFormatError(f"{where}: the FAISS index measures L2 distance; X-MoRe's neighbours are by cosine: "
                               "an inner-product index of normalised embeddings (autofaiss --metric_type ip)")


# ---------------------------------------------------------------------------------- building
def build_reference_corpus(out: str | Path, fingerprint: Any, dim: int, root: str, *,
                           index_file: str | Path | None = None, factory: str = "Flat", train_size: int = 100_000,
                           nprobe: int | None = 32, seed: int = 0,
                           use_text_embeddings: bool = False, progress: bool = False,
                           chunk: int = 65_536) -> dict[str, Any]:
    """A corpus directory that refers to the embedding folder ``root`` (see the module docstring):
    with ``index_file`` (a FAISS inner-product index whose ids are the folder's rows), nothing but the
    manifest is written; else an index made by ``factory`` is built from the folder, streamed, and kept
    beside the manifest. Everything is checked before anything is written, and the directory is built
    aside and renamed into place."""
    from tqdm import tqdm

    from coder_index.core.atomic import staged_directory

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise IndexFormatError(f"{out} exists and is not empty; choose a new corpus directory")
    t0 = time.perf_counter()
    folder = EmbeddingFolder(root)
    if folder.dim != dim:
        raise InputFormatError(f"{folder.public_root}: embeddings {folder.dim} wide, the CLIP model makes {dim}: "
                               "embed the images with the corpus's model")
    if use_text_embeddings:
        missing = [s.number for s in folder.shards if s.text is None]
        if missing:
            raise InputFormatError(f"--use-text-embeddings: {folder.public_root}/text_emb lacks shards {missing[:5]}")
    index_info: dict[str, Any]
    with staged_directory(out) as tmp:
        if index_file is not None:
            path = Path(index_file).resolve()
            try:
                index = read_index_mapped(path)
            except RuntimeError as exc:
                raise InputFormatError(f"--index-file {index_file}: not a FAISS index FAISS can read "
                                       f"({str(exc).splitlines()[-1]})") from None
            check_index(index, folder.rows, folder.dim, f"--index-file {index_file}")
            factory_used = "given"
            del index  # (its nprobe, if given, is set on open: the user's file is never written)
            index_info = {"path": str(path), **index_identity(path), "given": True}
        else:
            try:
                index = faiss.index_factory(folder.dim, factory, faiss.METRIC_INNER_PRODUCT)
            except RuntimeError as exc:
                raise InputFormatError(f"invalid --index-factory {factory!r}: {exc}") from None
            if not index.is_trained:
                rng = np.random.default_rng(seed)
                pick = np.sort(rng.choice(folder.rows, min(train_size, folder.rows), replace=False))
                index.train(normalize_rows(folder.vectors(pick)))
            with tqdm(total=folder.rows, unit="row", desc="indexing the corpus's image embeddings",
                      disable=not progress) as bar:
                for start in range(0, folder.rows, chunk):
                    ids = np.arange(start, min(start + chunk, folder.rows))
                    index.add(normalize_rows(folder.vectors(ids)))
                    bar.update(len(ids))
            keep_nprobe(index, nprobe)
            faiss.write_index(index, str(tmp / LOCAL_INDEX))
            del index
            factory_used = factory
            index_info = {"path": LOCAL_INDEX, **index_identity(tmp / LOCAL_INDEX), "given": False}
        manifest = {"format": FORMAT, "version": 2, "kind": REFERENCE,
                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "model": fingerprint.to_dict(), "dim": folder.dim, "factory": factory_used, "rows": folder.rows,
                    "embeddings": folder.fingerprint(), "index": index_info,
                    "use_text_embeddings": use_text_embeddings, "nprobe": nprobe,
                    "caption_template": "{caption}" if use_text_embeddings else CAPTION_TEMPLATE,
                    "sources": {"embeddings": folder.public_root, "shards": len(folder.shards), "reference": True},
                    "ingest_seconds": round(time.perf_counter() - t0, 2)}
        import json

        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    folder.close()
    return manifest
