"""Building a support set: M shots per class sampled with a seed, embeddings averaged over random
augmentations (random resized crop, scale 0.5-1, horizontal flip), as the released code does."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from coder_index.core.decode import ImageDecodeError, load_image
from coder_index.core.errors import InputFormatError
from coder_index.core.parallelism import parallel_encoding

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
    norm = next((t for t in getattr(encoder.preprocess, "transforms", []) if isinstance(t, transforms.Normalize)),
                None)
    mean = norm.mean if norm else (0.48145466, 0.4578275, 0.40821073)
    std = norm.std if norm else (0.26862954, 0.26130258, 0.27577711)
    return transforms.Compose([
        transforms.RandomResizedCrop(encoder.image_size, scale=(0.5, 1.0),
                                     interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(p=0.5),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


class _Augmented(Dataset):
    """Each item: the image under ``epochs`` augmentations, seeded per (seed, image, epoch)."""

    def __init__(self, paths: list[Path], transform: Callable, epochs: int, seed: int) -> None:
        self.paths, self.transform, self.epochs, self.seed = paths, transform, epochs, seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, Any, str | None]:
        try:
            img = load_image(self.paths[i])
        except ImageDecodeError as exc:
            return i, None, str(exc)
        views = []
        for e in range(self.epochs):
            torch.manual_seed(self.seed * 1_000_003 + i * 1_009 + e)  # reproducible in any worker
            views.append(self.transform(img))
        return i, torch.stack(views), None


def _collate(items: list) -> list:
    return items


def augmented_embeddings(encoder: ClipEncoder, paths: list[Path], epochs: int, seed: int, *, batch_size: int = 32,
                         workers: int | None = 0) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """[M, D] support embeddings: the mean of the raw (unnormalised) features of ``epochs`` augmented
    views, then L2-normalised, as the released code builds its cache keys (plain preprocessing if
    epochs == 0); and (path, reason) for files that could not be decoded (their rows are NaN)."""
    transform = encoder.preprocess if epochs == 0 else augmentation(encoder)
    n_views = max(epochs, 1)
    ds = _Augmented(paths, transform, n_views, seed)
    out = np.full((len(paths), encoder.embed_dim), np.nan, dtype=np.float32)
    with parallel_encoding(encoder, workers=workers) as plan:
        loader = DataLoader(ds, batch_size=batch_size, num_workers=plan.workers, collate_fn=_collate)
        return _average_views(encoder, loader, paths, n_views, out)


def _average_views(encoder: ClipEncoder, loader: Any, paths: list[Path], n_views: int, out: np.ndarray
                   ) -> tuple[np.ndarray, list[tuple[str, str]]]:
    errors = []
    for items in loader:
        ok = [(i, v) for i, v, _ in items if v is not None]
        errors += [(str(paths[i]), e) for i, v, e in items if v is None]
        if not ok:
            continue
        views = torch.cat([v for _, v in ok])                       # [B * E, 3, H, W]
        emb = encoder.encode_image_batch(views, normalize=False).reshape(len(ok), n_views, -1).mean(axis=1)
        out[[i for i, _ in ok]] = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    return out, errors
