"""Plain records that cross the index's boundary."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TextItem:
    """One text to add: tied to a class by name; kind is name/attribute/analogous/synonym."""

    class_name: str
    kind: str
    text: str
    template: str | None = None
    source: str | None = None
    weight: int = 1  # how many times the text counts in a class's mean (the released lists repeat some)


@dataclass(frozen=True)
class AddResult:
    added: int
    duplicates: int


@dataclass(frozen=True)
class TextTable:
    """The general texts of an index in id order, with their normalised embeddings."""

    ids: np.ndarray          # [K] int64, == FAISS ids
    class_ids: np.ndarray    # [K] int64
    kinds: np.ndarray        # [K] str
    embeddings: np.ndarray   # [K, D] float32, L2-normalised

    # A text of weight w appears w times (rows repeated), so every consumer averages as the released
    # code does without knowing about weights; with all weights 1 nothing is repeated.

    def __len__(self) -> int:
        return len(self.ids)
