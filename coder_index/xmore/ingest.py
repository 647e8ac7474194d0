"""Ingest entry points: a captioned image folder, or LAION-layout precomputed embeddings."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..parallelism import parallel_encoding
from ..pipeline.loader import iterate_batches
from .corpus import (
    Chunk,
    build_corpus,
    folder_captions,
    laion_chunks,
    laion_shards,
    sidecar_trace,
    validate_laion,
    validate_text_shards,
)

if TYPE_CHECKING:
    from ..encoder import ClipEncoder


def ingest_folder(out: str | Path, encoder: ClipEncoder, images: str | Path, captions: str | Path | None = None,
                  *, factory: str = "Flat", batch_size: int = 64, workers: int | None = None,
                  progress: bool = False) -> dict[str, Any]:
    images = Path(images)
    pairs = folder_captions(images, Path(captions) if captions else None)
    caption_of = dict(pairs)
    errors: list[tuple[str, str]] = []

    def chunks() -> Iterator[Chunk]:
        with parallel_encoding(encoder, workers=workers) as plan:
            for batch in iterate_batches(images, [p for p, _ in pairs], encoder.preprocess, batch_size=batch_size,
                                         workers=plan.workers, pin_memory=encoder.device.type == "cuda"):
                errors.extend(batch.errors)
                if batch.pixels is not None:
                    yield Chunk(encoder.encode_image_batch(batch.pixels), [caption_of[p] for p in batch.paths],
                                list(batch.paths), None, [sidecar_trace(images, p) for p in batch.paths])

    train = None
    if factory != "Flat":  # small folder corpora: train on everything, encoded once more
        raise ValueError("a folder corpus uses the Flat index; IVF/HNSW factories are for large precomputed "
                         "corpora (--embeddings)")
    sources = {"images": str(images), "captions": str(captions) if captions else "sidecar .txt files"}
    manifest = build_corpus(out, encoder, chunks(), len(pairs), factory=factory, train_sample=train,
                            sources=sources, progress=progress)
    manifest["skipped"] = errors
    return manifest


def ingest_laion(out: str | Path, encoder: ClipEncoder, root: str | Path, *, factory: str = "Flat",
                 train_size: int = 100_000, chunk: int = 65_536, seed: int = 0, progress: bool = False,
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
                        train_sample=train, sources=sources, progress=progress, encode=encode,
                        caption_template="{caption} (precomputed text_emb)" if use_text_embeddings else
                        "a photo of a {caption}")
