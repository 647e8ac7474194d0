"""Plain CLIP zero-shot: one prompt-ensembled text embedding per class (METHODS.md §5, ``W_cls``).

Used by ``eval``'s ``clip`` row, as the few-shot adapters' ``o_zs`` and as X-MoRe's class
embeddings. The prompts are, by default, CLIP's published list for the index's dataset (what
CLIP_benchmark measures; ImageNet's 80 templates where a dataset has none), or the released few-shot
code's list for an index built with ``--preset cvpr24 --task few-shot``. Their embeddings are kept
in the text embedding cache (``stores.textcache``), so a 1,000-class x 80-template ensemble is
encoded once per machine and model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from coder_index.core.presets import clip_prompts, data_file, fill, loader_class_names
from coder_index.core.validation import l2_normalize

if TYPE_CHECKING:
    from coder_index.stores.text_index import TextStore

from coder_index.core.choices import PROMPT_CHOICES


@dataclass(frozen=True)
class ZeroShotWeights:
    """``W_cls`` [C, D] (L2-normalised rows) and which prompts made it."""

    weights: np.ndarray
    prompts: str          # e.g. "clip:cifar10 (18 templates)"
    templates: tuple[str, ...]

    def logits(self, image_emb: np.ndarray) -> np.ndarray:
        from coder_index.methods.coder import LOGIT_SCALE

        return LOGIT_SCALE * (np.asarray(image_emb, dtype=np.float32) @ self.weights.T)


def prompt_templates(index: TextStore, prompts: str = "auto") -> tuple[str, list[str] | None]:
    """(name, templates) of the prompt set; ``None`` templates mean 'the index's name texts'."""
    if prompts not in PROMPT_CHOICES:
        raise ValueError(f"unknown prompt set {prompts!r}; choose from {', '.join(PROMPT_CHOICES)}")
    recipe = index.recipe
    if prompts == "names":
        return "names (the index's name texts)", None
    if prompts == "cvpr24" or (prompts == "auto" and recipe.is_released and recipe.task == "few-shot"):
        entry = data_file("cvpr24.json").get(recipe.released or "", {})
        fs = entry.get("few_shot")
        if not fs:
            if prompts == "cvpr24":
                raise ValueError(f"the released few-shot code has no prompt list for {recipe.released or 'this index'}")
        else:
            return f"cvpr24-few-shot:{recipe.released}", list(fs["zero_shot_prompts"])
    return clip_prompts(recipe.dataset)


def class_prompt_texts(class_names: list[str], templates: list[str]) -> list[str]:
    # CLIP's and the released few-shot code's class names carry spaces, not underscores
    return [fill(t, c.replace("_", " ")) for c in class_names for t in templates]


def zero_shot_weights(index: TextStore, prompts: str = "auto", *, progress: bool = False) -> ZeroShotWeights:
    """``W_cls``: per class the mean of its normalised prompt embeddings, normalised again."""
    return index.derived(f"zs:{prompts}", lambda: _zero_shot_weights(index, prompts, progress))


def _zero_shot_weights(index: TextStore, prompts: str, progress: bool) -> ZeroShotWeights:
    name, templates = prompt_templates(index, prompts)
    classes = index.class_names()
    if name.startswith("cvpr24-few-shot:"):
        # the released few-shot zero-shot term names the classes as its data loader does
        classes = loader_class_names(index.recipe.released, classes)
    if templates is None:
        table = index.text_table(("name",))
        counts = np.bincount(table.class_ids, minlength=len(classes))
        if (counts == 0).any():
            raise ValueError(f"{int((counts == 0).sum())} class(es) have no name text; rebuild the index")
        sums = torch.zeros((len(classes), table.embeddings.shape[1])).index_add_(
            0, torch.from_numpy(table.class_ids), torch.from_numpy(table.embeddings))
        means = sums.numpy() / counts[:, None].astype(np.float32)
    else:
        texts = class_prompt_texts(classes, templates)
        emb = index.encode_texts_cached(texts, progress=progress, desc="encoding CLIP prompt texts")
        # float32 mean over each class's templates, as CLIP and CLIP_benchmark compute it
        means = torch.from_numpy(emb).reshape(len(classes), len(templates), -1).mean(dim=1).numpy()
    w = l2_normalize(np.ascontiguousarray(means, dtype=np.float32), "class prompt embeddings")
    out = ZeroShotWeights(w, f"{name} ({len(templates) if templates else 'name'} templates)",
                          tuple(templates or ()))
    return out
