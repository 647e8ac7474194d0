"""Building a support set: M shots per class sampled with a seed, embeddings averaged over random
augmentations (random resized crop, scale 0.5-1, horizontal flip), as the released code does."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from torchvision import transforms

from coder_index.core.errors import InputFormatError
from coder_index.core.parallelism import parallel_encoding
from coder_index.pipeline.encode_images import encoded_batches
from coder_index.pipeline.feed import Views, split_preprocess
from coder_index.pipeline.sources.files import units_of

if TYPE_CHECKING:
    from coder_index.model.encoder import ClipEncoder
    from coder_index.pipeline.labelled import LabelledSet


def sample_shots(data: LabelledSet, shots: int, seed: int, allow_fewer: bool = False
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(support indices, their shot numbers, the remaining indices), per class, reproducible."""
    if shots < 1:
        raise ValueError("--shots must be at least 1")
    rng = np.random.default_rng(seed)
    n_classes = len(data.class_names)
    short = []
    support, shot_no, rest = [], [], []
    for c in range(n_classes):
        idx = np.flatnonzero(data.labels == c)
        if len(idx) < shots:
            short.append(f"{data.class_names[c]} ({len(idx)})")
        idx = idx[rng.permutation(len(idx))]
        support += idx[:shots].tolist()
        shot_no += list(range(min(shots, len(idx))))
        rest += idx[shots:].tolist()
    if short and not allow_fewer:
        raise InputFormatError(
            f"{len(short)} class(es) have fewer than {shots} images: {', '.join(short[:8])}"
            f"{' …' if len(short) > 8 else ''}. Use a smaller --shots, add images, or pass --allow-fewer to use "
            "what there is")
    return np.asarray(support, np.int64), np.asarray(shot_no, np.int64), np.asarray(sorted(rest), np.int64)


def augmentation(encoder: ClipEncoder) -> Callable:
    """The released support augmentation, whole (PIL -> normalised tensor): for a preprocessing that
    cannot be split at ToTensor."""
    norm = next((t for t in getattr(encoder.preprocess, "transforms", []) if isinstance(t, transforms.Normalize)),
                None)
    mean = norm.mean if norm else (0.48145466, 0.4578275, 0.40821073)
    std = norm.std if norm else (0.26862954, 0.26130258, 0.27577711)
    return transforms.Compose([augmentation_geometry(encoder), transforms.ToTensor(), transforms.Normalize(mean, std)])


def augmentation_geometry(encoder: ClipEncoder) -> Callable:
    """The released support augmentation's random geometry (PIL -> PIL): a random resized crop
    (scale 0.5-1, bicubic) and a horizontal flip; the feed turns it into the model's pixels exactly
    as its preprocessing's ToTensor and Normalize do."""
    return transforms.Compose([
        transforms.RandomResizedCrop(encoder.image_size, scale=(0.5, 1.0),
                                     interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(p=0.5),
    ])


@dataclass
class SupportEmbeddings:
    keys: np.ndarray                     # [M, D] the mean of all views, L2-normalised (NaN rows: not decoded)
    errors: list[tuple[str, str]]        # (path, reason) of the files that could not be decoded
    first: dict[int, np.ndarray] = field(default_factory=dict)  # {n: [M, D]} the means of the first n views


def augmented_embeddings(encoder: ClipEncoder, paths: list[Path], epochs: int, seed: int, *, batch_size: int = 32,
                         workers: int | None = 0, threads: int | None = None, decode: str = "cpu",
                         also_first: tuple[int, ...] = ()) -> SupportEmbeddings:
    """Support embeddings: the mean of the raw (unnormalised) features of ``epochs`` augmented views,
    then L2-normalised, as the released code builds its cache keys (plain preprocessing if epochs ==
    0, through ``decode``'s feed), and the same mean over each image's first n views for every n of
    ``also_first`` below ``epochs`` (the views are the same, so they are encoded once). Files that
    could not be decoded are listed with their reason (their rows are NaN). Images come through the
    one feed (``encode_images``)."""
    if epochs > 0:
        views = Views(augmentation_geometry(encoder), epochs, seed, tensor=augmentation(encoder),
                      prefixes=tuple(n for n in also_first if 0 < n < epochs))
    else:  # one plain view: the released keys are raw features, normalised after the (trivial) mean
        parts = split_preprocess(encoder.preprocess)
        views = Views(parts.geometry if parts is not None else encoder.preprocess, 1, seed,
                      tensor=encoder.preprocess)
    out = np.full((len(paths), encoder.embed_dim), np.nan, dtype=np.float32)
    first = {n: out.copy() for n in views.prefixes}
    errors: list[tuple[str, str]] = []
    with parallel_encoding(encoder, threads=threads, workers=workers) as plan:
        for batch in encoded_batches(encoder, units_of(list(paths)), batch_size=batch_size, workers=plan.workers,
                                     decode=decode, views=views):
            errors += [(e.row, e.reason) for e in [*batch.errors, *batch.failures]]
            if batch.embeddings is not None:
                out[batch.positions] = batch.embeddings
                for n, emb in batch.prefix_embeddings.items():
                    first[n][batch.positions] = emb
    return SupportEmbeddings(out, errors, first)
