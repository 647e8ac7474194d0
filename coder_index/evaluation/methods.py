"""The zero-shot methods `eval` compares, each a function of image embeddings -> logits [N, C].

- clip: one prompt-ensembled text embedding per class (``zeroshot.py``: CLIP's published prompts for
  the index's dataset by default)
- vcd: descriptor averaging (Menon & Vondrick): mean cosine to the class's attribute texts
- coder and its text-kind ablations (paper Table 2): stage-1 heuristic logits over a kind subset
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from coder_index.methods.coder import LOGIT_SCALE, CoderClassifier
from coder_index.methods.zeroshot import zero_shot_weights

if TYPE_CHECKING:
    from coder_index.methods.text_index import TextIndex

from coder_index.core.choices import ABLATIONS, ALL_METHODS, RERANK_METHODS, STAGE1_METHODS  # noqa: F401 - re-exported


def clip_classifier(index: TextIndex, prompts: str = "auto", progress: bool = False
                    ) -> Callable[[np.ndarray], np.ndarray]:
    """Plain CLIP zero-shot with a prompt ensemble: ``100 * x^ @ W_cls^T`` (METHODS.md §5)."""
    return zero_shot_weights(index, prompts, progress=progress).logits


def vcd_classifier(index: TextIndex) -> Callable[[np.ndarray], np.ndarray]:
    """Mean cosine to each class's attribute texts; a class without any falls back to its names."""
    n = len(index.class_names())
    att = index.text_table(("attribute",))
    names = index.text_table(("name",))
    have = np.bincount(att.class_ids, minlength=n) > 0
    use_names = ~have[names.class_ids]
    emb = np.concatenate([att.embeddings, names.embeddings[use_names]])
    cls = np.concatenate([att.class_ids, names.class_ids[use_names]])
    counts = np.bincount(cls, minlength=n).astype(np.float32)
    index_t = torch.from_numpy(cls)

    def logits(x: np.ndarray) -> np.ndarray:
        sims = torch.from_numpy(np.ascontiguousarray(emb @ x.T))       # [K, N]
        total = torch.zeros((n, x.shape[0])).index_add_(0, index_t, sims).numpy()
        return np.ascontiguousarray((LOGIT_SCALE * total / counts[:, None]).T)

    return logits


def coder_classifier(index: TextIndex, kinds: tuple[str, ...]) -> Callable[[np.ndarray], np.ndarray]:
    table = index.text_table(kinds)
    clf = CoderClassifier(table.embeddings, table.class_ids, table.kinds, len(index.class_names()))
    return lambda x: clf.logits(x, normalized=True)


def stage1_classifier(index: TextIndex, method: str, prompts: str = "auto",
                      progress: bool = False) -> Callable[[np.ndarray], np.ndarray]:
    if method == "clip":
        return clip_classifier(index, prompts, progress)
    if method == "vcd":
        return vcd_classifier(index)
    if method == "coder":
        return coder_classifier(index, ABLATIONS["P+Att+Ana+Syn"])
    if method in ABLATIONS:
        return coder_classifier(index, ABLATIONS[method])
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(ALL_METHODS)}")
