"""Decode + preprocess in worker processes (torch DataLoader), overlapped with encoding.

A file that fails to decode travels through the loader as an error record instead of a tensor,
so one bad file never stops a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from coder_index.core.decode import ImageDecodeError, load_image


@dataclass
class LoadedBatch:
    paths: list[str]                 # relative paths of the decoded images, aligned with ``pixels``
    pixels: torch.Tensor | None      # [n, 3, H, W]
    errors: list[tuple[str, str]]    # (relative path, reason)

    def pin_memory(self) -> LoadedBatch:
        """Called by the DataLoader with ``pin_memory``: page-locked pixels copy to a GPU asynchronously."""
        if self.pixels is not None:
            self.pixels = self.pixels.pin_memory()
        return self


class _ImageFiles(Dataset):
    def __init__(self, root: Path, rel_paths: list[str], preprocess: Callable) -> None:
        self.root = root
        self.rel_paths = rel_paths
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.rel_paths)

    def __getitem__(self, i: int) -> tuple[str, torch.Tensor | None, str | None]:
        rel = self.rel_paths[i]
        try:
            return rel, self.preprocess(load_image(self.root / rel)), None
        except ImageDecodeError as exc:
            return rel, None, str(exc)
        except Exception as exc:  # a preprocessing failure on a strange image must not kill the run
            return rel, None, f"could not preprocess: {exc.__class__.__name__}: {exc}"


def _collate(samples: list[tuple[str, torch.Tensor | None, str | None]]) -> LoadedBatch:
    ok = [(p, t) for p, t, _ in samples if t is not None]
    return LoadedBatch([p for p, _ in ok], torch.stack([t for _, t in ok]) if ok else None,
                       [(p, e) for p, t, e in samples if t is None])


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers decode; the main process owns the cores for encoding


def iterate_batches(root: Path, rel_paths: list[str], preprocess: Callable, *, batch_size: int,
                    workers: int, pin_memory: bool = False) -> Iterator[LoadedBatch]:
    """Batches in order; ``pin_memory`` (for a CUDA encoder) page-locks them so that the copy to the
    GPU overlaps the previous batch's compute. Each worker keeps 4 batches ready."""
    loader = DataLoader(
        _ImageFiles(root, rel_paths, preprocess), batch_size=batch_size, shuffle=False,
        num_workers=workers, collate_fn=_collate, worker_init_fn=_worker_init if workers else None,
        prefetch_factor=4 if workers else None, persistent_workers=False, pin_memory=pin_memory,
    )
    yield from loader
