"""Plain CLIP zero-shot: one prompt-ensembled text embedding per class (METHODS.md §5, ``W_cls``).

Used by ``eval``'s ``clip`` row, as the few-shot adapters' ``o_zs`` and as X-MoRe's class
embeddings. The prompts are, by default, CLIP's published list for the index's dataset (what
CLIP_benchmark measures; ImageNet's 80 templates where a dataset has none), or the released few-shot
code's list for an index built with ``--preset cvpr24 --task few-shot``. Their embeddings are cached
on disk per model, so a 1,000-class x 80-template ensemble is encoded once per machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from sqlalchemy import Column, LargeBinary, MetaData, String, Table, Text, insert, select, tuple_

from coder_index.core.atomic import cache_dir, translate_disk_full
from coder_index.core.presets import clip_prompts, data_file, fill, loader_class_names
from coder_index.core.validation import l2_normalize
from coder_index.stores.schema import make_engine

if TYPE_CHECKING:
    from coder_index.model.encoder import ClipEncoder
    from coder_index.stores.text_index import TextStore

from coder_index.core.choices import PROMPT_CHOICES

_meta = MetaData()
text_embeddings = Table(
    "text_embeddings", _meta,
    Column("text", Text, primary_key=True),
    Column("model_sha", String(64), primary_key=True),
    Column("vector", LargeBinary, nullable=False),  # float32 bytes, L2-normalised
)


class TextEmbeddingCache:
    """Text embeddings keyed by (text, model weights); a miss is encoded and stored."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else cache_dir() / "text-embeddings.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.engine = make_engine(self.path, synchronous="NORMAL")
        with translate_disk_full(self.path):
            _meta.create_all(self.engine)

    def encode(self, encoder: ClipEncoder, texts: list[str], *, progress: bool = False,
               desc: str = "encoding prompt texts") -> np.ndarray:
        sha = encoder.fingerprint.weights_sha256
        distinct = list(dict.fromkeys(texts))
        found: dict[str, bytes] = {}
        t = text_embeddings
        with self.engine.connect() as conn:
            for i in range(0, len(distinct), 500):
                q = select(t.c.text, t.c.vector).where(
                    tuple_(t.c.text, t.c.model_sha).in_([(x, sha) for x in distinct[i:i + 500]]))
                found.update({r[0]: r[1] for r in conn.execute(q)})
        missing = [x for x in distinct if x not in found]
        if missing:
            from tqdm import tqdm

            chunk = 2048
            with tqdm(total=len(missing), unit="text", desc=desc, disable=not progress) as bar:
                for s in range(0, len(missing), chunk):
                    part = missing[s:s + chunk]
                    vecs = encoder.encode_texts(part)
                    rows = [{"text": x, "model_sha": sha, "vector": v.astype(np.float32).tobytes()}
                            for x, v in zip(part, vecs, strict=True)]
                    with translate_disk_full(self.path), self.engine.begin() as conn:
                        conn.execute(insert(t).prefix_with("OR REPLACE"), rows)
                    found.update({r["text"]: r["vector"] for r in rows})
                    bar.update(len(part))
        return np.stack([np.frombuffer(found[x], dtype=np.float32) for x in texts])


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


def zero_shot_weights(index: TextStore, prompts: str = "auto", *, cache: TextEmbeddingCache | None = None,
                      progress: bool = False) -> ZeroShotWeights:
    """``W_cls``: per class the mean of its normalised prompt embeddings, normalised again."""
    key = f"zs:{prompts}"
    if key in index._cache:
        return index._cache[key]
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
        emb = (cache or TextEmbeddingCache()).encode(index.encoder, texts, progress=progress,
                                                     desc="encoding CLIP prompt texts")
        # float32 mean over each class's templates, as CLIP and CLIP_benchmark compute it
        means = torch.from_numpy(emb).reshape(len(classes), len(templates), -1).mean(dim=1).numpy()
    w = l2_normalize(np.ascontiguousarray(means, dtype=np.float32), "class prompt embeddings")
    out = ZeroShotWeights(w, f"{name} ({len(templates) if templates else 'name'} templates)",
                          tuple(templates or ()))
    index._cache[key] = out
    return out
