"""Ingest entry points: a captioned image folder, or LAION-layout precomputed embeddings."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from coder_index.core.errors import InputFormatError
from coder_index.core.parallelism import parallel_encoding
from coder_index.core.untrusted import read_bytes, read_text
from coder_index.pipeline.discover import discover_images
from coder_index.pipeline.encode_images import encoded_batches
from coder_index.pipeline.feed import resolve_decode
from coder_index.pipeline.sources.files import FileUnit
from coder_index.stores.corpus import (
    Chunk,
    build_corpus,
    laion_chunks,
    laion_shards,
    validate_laion,
    validate_text_shards,
)

if TYPE_CHECKING:
    from coder_index.model.encoder import ClipEncoder


def ingest_folder(out: str | Path, encoder: ClipEncoder, images: str | Path, captions: str | Path | None = None,
                  *, factory: str = "Flat", nprobe: int | None = None, batch_size: int = 64,
                  workers: int | None = None, threads: int | None = None, progress: bool = False,
                  decode: str = "auto") -> dict[str, Any]:
    """A corpus of a captioned image folder; its images come through the one feed (``encode_images``,
    ``decode`` as classify's ``--decode``)."""
    images = Path(images)
    decode = resolve_decode(decode, encoder.device)
    pairs = folder_captions(images, Path(captions) if captions else None)
    caption_of = dict(pairs)
    errors: list[tuple[str, str]] = []

    units = [FileUnit(rel, os.path.abspath(images / rel), i) for i, (rel, _) in enumerate(pairs)]

    def chunks() -> Iterator[Chunk]:
        with parallel_encoding(encoder, threads=threads, workers=workers) as plan:
            for batch in encoded_batches(encoder, units, batch_size=batch_size, workers=plan.workers, decode=decode):
                errors.extend((e.row, e.reason) for e in [*batch.errors, *batch.failures])
                if batch.embeddings is not None:
                    yield Chunk(batch.embeddings, [caption_of[p] for p in batch.items],
                                list(batch.items), None, [sidecar_trace(images, p) for p in batch.items])

    train = None
    if factory != "Flat":  # small folder corpora: train on everything, encoded once more
        raise ValueError("a folder corpus uses the Flat index; IVF/HNSW factories are for large precomputed "
                         "corpora (--embeddings)")
    sources = {"images": str(images), "captions": str(captions) if captions else "sidecar .txt files"}
    manifest = build_corpus(out, encoder, chunks(), len(pairs), factory=factory, nprobe=nprobe, train_sample=train,
                            sources=sources, progress=progress)
    manifest["skipped"] = errors
    return manifest


def ingest_shards(out: str | Path, encoder: ClipEncoder, shards: list[str], *, factory: str = "Flat",
                  nprobe: int | None = None, batch_size: int = 64, workers: int | None = None,
                  threads: int | None = None, progress: bool = False, decode: str = "auto") -> dict[str, Any]:
    """A corpus of webdataset shards (local, compressed, by URL or pipe:, read by ``sources.shards``): each
    sample's image with its ``.txt`` caption; samples without a caption are left out (counted in
    ``skipped``), their key and URL (from the ``.json`` sidecar, as img2dataset writes it) kept."""
    from coder_index.pipeline.sources.base import ItemError, ReadFailure
    from coder_index.pipeline.sources.shards import ShardSource

    if factory != "Flat":
        raise ValueError("a shard corpus uses the Flat index; IVF/HNSW factories are for large precomputed "
                         "corpora (--embeddings)")
    decode = resolve_decode(decode, encoder.device)
    errors: list[tuple[str, str]] = []
    uncaptioned = [0]
    units = []
    for u in ShardSource(list(shards)).units():
        if isinstance(u, (ItemError, ReadFailure)):
            errors.append((u.row, u.reason))
        else:
            units.append(u)

    def chunks() -> Iterator[Chunk]:
        rows = 0
        with parallel_encoding(encoder, threads=threads, workers=workers) as plan:
            for batch in encoded_batches(encoder, units, batch_size=batch_size, workers=plan.workers, decode=decode):
                errors.extend((e.row, e.reason) for e in [*batch.errors, *batch.failures])
                if batch.embeddings is None:
                    continue
                keep = [i for i, m in enumerate(batch.samples) if m.caption]
                uncaptioned[0] += len(batch.samples) - len(keep)
                chosen = [batch.samples[i] for i in keep]
                rows += len(chosen)
                yield Chunk(batch.embeddings[keep], [m.caption for m in chosen], [m.row for m in chosen], None,
                            [_shard_trace(m) for m in chosen])
        if rows == 0:  # raised inside the build: nothing is left behind
            raise InputFormatError("the shards hold no captioned image (a KEY.txt beside KEY.jpg, as img2dataset "
                                   "writes them); nothing to build a corpus from")

    from coder_index.core.remote import public_url

    sources = {"shards": [public_url(s) for s in shards][:100], "captions": "the shards' .txt members"}
    manifest = build_corpus(out, encoder, chunks(), None, factory=factory, nprobe=nprobe, sources=sources,
                            progress=progress)
    manifest["skipped"] = errors
    manifest["uncaptioned"] = uncaptioned[0]
    return manifest


def _take_key_and_url(meta: Any, out: dict[str, str | None]) -> None:
    """img2dataset's ``key`` and ``url`` of a sample's JSON metadata, where it has them, into ``out``."""
    if isinstance(meta, dict):
        for k in ("key", "url"):
            if isinstance(meta.get(k), (str, int)):
                out[k] = str(meta[k])


def _shard_trace(m: Any) -> dict[str, str | None]:
    out: dict[str, str | None] = {"image_path": m.row, "key": m.key}
    if m.meta:
        try:
            meta = json.loads(m.meta)
        except (ValueError, RecursionError):
            return out
        _take_key_and_url(meta, out)
    return out


def ingest_laion(out: str | Path, encoder: ClipEncoder, root: str | Path, *, factory: str = "Flat",
                 nprobe: int | None = None, train_size: int = 100_000, chunk: int = 65_536, seed: int = 0,
                 progress: bool = False,
                 use_text_embeddings: bool = False, encode: Callable[[list[str]], np.ndarray] | None = None
                 ) -> dict[str, Any]:
    """``encode(texts)`` encodes the captions instead of ``encoder`` (e.g. a ``RayTextEncoder``).
    ``use_text_embeddings`` takes LAION's text_emb shards (raw captions, no "a photo of a" prompt:
    an approximation of X-MoRe's prompted captions) instead of encoding every caption here."""
    shards = laion_shards(Path(root))
    total = validate_laion(shards, encoder.embed_dim)  # everything checked before anything is written
    if use_text_embeddings:
        validate_text_shards(shards, encoder.embed_dim)
    train = None
    if factory != "Flat":
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(total, min(train_size, total), replace=False))
        parts, start = [], 0
        for emb_path, _ in shards:
            arr = np.load(emb_path, mmap_mode="r", allow_pickle=False)
            local = pick[(pick >= start) & (pick < start + arr.shape[0])] - start
            parts.append(np.asarray(arr[local]))
            start += arr.shape[0]
        train = np.concatenate(parts)
    sources = {"embeddings": str(root), "shards": len(shards), "train_rows": 0 if train is None else len(train)}
    return build_corpus(out, encoder, laion_chunks(shards, chunk, use_text_embeddings), total, factory=factory,
                        nprobe=nprobe,
                        train_sample=train, sources=sources, progress=progress, encode=encode,
                        caption_template="{caption} (precomputed text_emb)" if use_text_embeddings else
                        "a photo of a {caption}")


def folder_captions(images: Path, captions_file: Path | None) -> list[tuple[str, str]]:
    """(relative image path, caption) from a captions CSV, or from img2dataset's sidecar .txt files."""
    import csv

    found = discover_images(images)
    if captions_file is not None:
        reader = csv.DictReader(io.StringIO(read_text(captions_file, "captions CSV"), newline=""))
        if not reader.fieldnames or not {"path", "caption"} <= set(reader.fieldnames):
            raise InputFormatError(f"{captions_file}: a captions CSV needs the columns path,caption")
        pairs = [(r["path"], r["caption"]) for r in reader]
        missing = [p for p, _ in pairs if not (images / p).is_file()]
        if missing:
            raise InputFormatError(f"{len(missing)} captioned file(s) do not exist under {images} "
                                   f"(first: {missing[:3]})")
        return [(p, c) for p, c in pairs if c and c.strip()]
    pairs = []
    for rel in found.images:
        side = (images / rel).with_suffix(".txt")
        if side.is_file():  # a regular file: is_file() is False for FIFOs and devices
            try:
                cap = read_bytes(side, "caption file", max_bytes=1 << 20).decode("utf-8", "replace").strip()
            except InputFormatError:
                continue  # an unreadable or oversized sidecar: the image has no caption
            if cap:
                pairs.append((rel, cap))
    if not pairs:
        raise InputFormatError(f"{images} has no captions: pass --captions FILE (path,caption) or keep "
                               "img2dataset's sidecar .txt files next to the images")
    return pairs


def sidecar_trace(images: Path, rel: str) -> dict[str, str | None]:
    """key / url from img2dataset's .json sidecar beside an image (if any), and the image's path."""
    out: dict[str, str | None] = {"image_path": rel}
    side = (images / rel).with_suffix(".json")
    if side.is_file():
        try:
            meta = json.loads(read_bytes(side, "sidecar", max_bytes=1 << 20))
        except (InputFormatError, ValueError, RecursionError):
            return out
        _take_key_and_url(meta, out)
    return out
