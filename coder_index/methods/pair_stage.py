"""Stage 2 on demand: pair texts for the pairs that meet in the images' top-5, then the rerank.

Pairs already in the index are reused; missing ones are generated with the Auto Text Generator's
one-to-one prompt (one prompt serves both directions; concurrent, cached, budgeted), embedded with
``Because of {feature}, {a} is different from {b}`` and stored, so a second run sends no request.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from coder_index.methods.predict import top_k
from coder_index.methods.rerank import RerankDecision, rerank_decisions
from coder_index.stores import pairs as pair_store

if TYPE_CHECKING:
    from coder_index.stores.text_index import TextStore
    from coder_index.textgen.generator import AutoTextGenerator

log = logging.getLogger(__name__)


@dataclass
class PairStageStats:
    pairs_needed: int = 0        # distinct ordered pairs met in top-k lists
    pairs_generated: int = 0     # of those, texts generated in this run
    pairs_without_texts: int = 0  # still without texts (no LLM, unusable answer or budget)
    stopped_by_budget: bool = False
    notes: list[str] = field(default_factory=list)


def top_pairs(logits: np.ndarray, top: int = 5, ties: str = "index") -> set[tuple[int, int]]:
    """Distinct ordered class pairs within the images' stage-1 top lists (vectorised)."""
    idx, _ = top_k(logits, min(top, logits.shape[1]), ties=ties)
    t = idx.shape[1]
    ii, jj = np.nonzero(~np.eye(t, dtype=bool))
    pairs = np.unique(np.stack([idx[:, ii].ravel(), idx[:, jj].ravel()], axis=1), axis=0)
    return {(int(a), int(b)) for a, b in pairs}


class PairReranker:
    """Callable ``(image_emb, logits) -> final class ids`` with pair texts fetched on demand."""

    def __init__(self, index: TextStore, generator: AutoTextGenerator | None, *, top: int = 5,
                 gap_threshold: float | None = None, progress: bool = False) -> None:
        self.index = index
        self.generator = generator if generator is not None and generator.llm is not None else None
        self.top = top
        self.gap_threshold = gap_threshold
        self.progress = progress
        self.stats = PairStageStats()
        self._seen: set[tuple[int, int]] = set()
        # the cvpr24 preset orders exact ties at the top-k cut as the released code's torch.topk
        self.ties = "torch" if index.recipe.is_released else "index"

    def ensure_pairs(self, pairs: set[tuple[int, int]]) -> None:
        new = pairs - self._seen
        self._seen |= new
        self.stats.pairs_needed += len(new)
        missing = sorted(new - pair_store.pairs_with_texts(self.index, new))
        if not missing:
            return
        if self.generator is None:
            self.stats.pairs_without_texts += len(missing)
            return
        names = self.index.class_names()
        wanted = [(names[a], names[b]) for a, b in missing]
        features, stopped = self.generator.one_to_one(wanted, progress=self.progress)
        self.stats.stopped_by_budget |= stopped
        got = {p: f for p, f in features.items() if f}
        if got:
            pair_store.add_pair_texts(self.index, got, source=self.generator.source)
        self.stats.pairs_generated += len(got)
        self.stats.pairs_without_texts += len(missing) - len(got)

    def __call__(self, image_emb: np.ndarray, logits: np.ndarray) -> np.ndarray:
        return self.decide(image_emb, logits).final

    def decide(self, image_emb: np.ndarray, logits: np.ndarray) -> RerankDecision:
        """The final classes and what decided them (``rerank.RerankDecision``)."""
        pairs = top_pairs(logits, self.top, self.ties)
        self.ensure_pairs(pairs)
        return rerank_decisions(image_emb, logits, pair_store.pair_table(self.index, pairs), top=self.top,
                                gap_threshold=self.gap_threshold, ties=self.ties)

    def summary(self) -> str:
        s = self.stats
        msg = (f"rerank: {s.pairs_needed} class pair(s) met in top-{self.top} lists, "
               f"{s.pairs_generated} generated now, {s.pairs_without_texts} without texts (count as ties)")
        if s.stopped_by_budget:
            msg += "; stopped at the request budget"
        return msg
