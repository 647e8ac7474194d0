"""`fewshot fit`: sample the support set, embed it with augmentations, search the hyper-parameters
of both adapters on validation data, save the adapter directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from coder_index.core.errors import InputFormatError
from coder_index.core.linalg import matmul_t
from coder_index.core.presets import few_shot_defaults, tip_adapter_config
from coder_index.core.remote import public_url
from coder_index.methods.fewshot.adapter import CoderAdapter, SearchGrid, TipAdapter, search_hyperparameters
from coder_index.methods.fewshot.model import new_manifest, save_adapter
from coder_index.methods.zeroshot import zero_shot_weights
from coder_index.pipeline.feed import resolve_decode
from coder_index.pipeline.labelled import LabelledSet, embed_labelled
from coder_index.pipeline.support_views import augmented_embeddings, sample_shots
from coder_index.stores.embcache import EmbeddingCache, image_embedding_key

if TYPE_CHECKING:
    from coder_index.methods.text_index import TextIndex

DEFAULT_KINDS = ["name", "attribute", "analogous"]  # the released code's few-shot text set


@dataclass
class FitConfig:
    shots: int = 16
    seed: int = 1
    augment_epochs: int | None = None  # None: the released config of the index's dataset (20; pets 10; ImageNet 1)
    kinds: tuple[str, ...] = tuple(DEFAULT_KINDS)
    allow_fewer: bool = False
    val_per_class: int = 8
    T: float = 1.0  # noqa: N815 - the paper's symbol
    search: str = "released"   # the released 3 x (500 beta x 50 alpha) grid, or "fast"
    prompts: str = "auto"      # zero-shot prompts of o_zs (zeroshot.PROMPT_CHOICES)
    batch_size: int = 32
    workers: int | None = None  # None: chosen from the cores and the model
    threads: int | None = None  # torch threads of the encoding process (None: chosen likewise)
    decode: str = "auto"        # the validation images' feed (classify's --decode); support views are Pillow's


def validation_split(data: LabelledSet, rest: np.ndarray, per_class: int, seed: int) -> LabelledSet:
    """Up to ``per_class`` non-support images per class, sampled with the seed."""
    rng = np.random.default_rng(seed + 7919)
    chosen = []
    for c in range(len(data.class_names)):
        idx = rest[data.labels[rest] == c]
        chosen += idx[rng.permutation(len(idx))[:per_class]].tolist()
    chosen = sorted(chosen)
    return LabelledSet([data.paths[i] for i in chosen], data.labels[chosen], data.class_names)


def fit_adapter(index: TextIndex, support_data: LabelledSet, out: str | Path, cfg: FitConfig,
                val_data: LabelledSet | None = None, cache_path: str | Path | None = None,
                progress: bool = False) -> dict[str, Any]:
    support_idx, shot_no, rest = sample_shots(support_data, cfg.shots, cfg.seed, cfg.allow_fewer)
    if val_data is None:
        val_data = validation_split(support_data, rest, cfg.val_per_class, cfg.seed)
        val_source = f"held out from the support folder ({cfg.val_per_class} per class at most)"
    else:
        val_source = "--val folder"
    if len(val_data) == 0:
        raise InputFormatError("no validation images: pass --val DIR, or have more images per class than --shots")

    recipe = index.recipe
    defaults = few_shot_defaults(recipe.released or recipe.dataset)
    epochs = defaults["augment_epochs"] if cfg.augment_epochs is None else cfg.augment_epochs
    tip_epochs = tip_adapter_epochs(recipe, epochs, cfg.augment_epochs)
    encoder = index.encoder
    paths = [support_data.paths[i] for i in support_idx]
    labels = support_data.labels[support_idx]
    # one encoding of max(epochs, tip_epochs) views: each adapter's keys average its own first views
    support = augmented_embeddings(encoder, paths, max(epochs, tip_epochs), cfg.seed, batch_size=cfg.batch_size,
                                   workers=cfg.workers, threads=cfg.threads, also_first=(epochs, tip_epochs))
    emb, tip_emb = (support.first.get(n, support.keys) for n in (epochs, tip_epochs))
    errors = support.errors
    ok = ~np.isnan(emb).any(axis=1)
    emb, tip_emb, labels, shot_no = emb[ok], tip_emb[ok], labels[ok], shot_no[ok]
    paths = [p for p, k in zip(paths, ok, strict=True) if k]

    table = index.text_table(tuple(cfg.kinds))
    if len(table) == 0:
        raise InputFormatError(f"the index holds no texts of kinds {list(cfg.kinds)}")
    support_coder = matmul_t(emb, table.embeddings)

    fp = index.fingerprint
    decode = resolve_decode(cfg.decode, index.compute_device, released=recipe.is_released)
    cache = EmbeddingCache(cache_path, image_embedding_key(fp.weights_sha256, decode), fp.embed_dim)
    val_x, keep, _ = embed_labelled(index, val_data, cache, batch_size=cfg.batch_size, workers=cfg.workers,
                                    threads=cfg.threads, progress=progress, decode=decode)
    val_y = val_data.labels[keep]
    zs_weights = zero_shot_weights(index, cfg.prompts, progress=progress)
    val_zs = zs_weights.logits(val_x)
    n_classes = len(index.class_names())
    init = (defaults["init_alpha"], defaults["init_beta"])  # the released configs' starting point, reported
    coder = CoderAdapter(*init, cfg.T).fit(support_coder, labels, n_classes)
    coder_search = search_hyperparameters(coder, matmul_t(val_x, table.embeddings), val_y, val_zs, search=cfg.search,
                                          init=init)
    tip_grid, tip_init, tip_source = tip_adapter_search(recipe, cfg.search, init)
    tip = TipAdapter(*tip_init, cfg.T).fit(tip_emb, labels, n_classes)
    tip_search = search_hyperparameters(tip, val_x, val_y, val_zs, search=tip_grid, init=tip_init)
    tip_search["grid_source"] = tip_source

    manifest = new_manifest(index, list(cfg.kinds), table.ids, shots=cfg.shots, seed=cfg.seed,
                            augment_epochs=epochs, tip_adapter_augment_epochs=tip_epochs,
                            support_images=int(len(paths)),
                            validation={"source": val_source, "images": int(len(val_y))},
                            zero_shot_prompts=zs_weights.prompts,
                            adapters={"coder-adapter": _summary(coder_search), "tip-adapter": _summary(tip_search)},
                            search={"grid": cfg.search, "coder-adapter": coder_search["rounds"],
                                    "tip-adapter": tip_search["rounds"], "tip-adapter grid": tip_source},
                            skipped=errors)
    rows = [{"path": public_url(str(p)), "label": int(y), "shot": int(s), "augment_epochs": epochs}
            for p, y, s in zip(paths, labels, shot_no, strict=True)]
    save_adapter(out, manifest, table.ids, support_coder, tip_emb, rows, zs_weights.weights)
    return manifest


def tip_adapter_epochs(recipe: Any, coder_epochs: int, given: int | None) -> int:
    """The augmented views the Tip-Adapter baseline's keys average. Under the cvpr24 preset, Tip-Adapter's
    own release's ``augment_epoch`` for the dataset (10 in all its configs; CODER's configs say 20); a
    given ``--augment-epochs`` sets both adapters; otherwise CODER-Adapter's."""
    tip = tip_adapter_config(recipe.released) if recipe.is_released else None
    if given is not None or tip is None:
        return coder_epochs
    return int(tip.get("augment_epoch", coder_epochs))


def tip_adapter_search(recipe: Any, search: str, init: tuple[float, float]
                       ) -> tuple[str | SearchGrid, tuple[float, float], str]:
    """(grid, initial (alpha, beta), where the grid comes from) of the Tip-Adapter baseline.

    Under the cvpr24 preset with the released grid, Tip-Adapter is searched as Tip-Adapter's own
    release does for the dataset: ``search_step`` values on [0.1, ``search_scale``) for beta and
    alpha, one round, from its own initial values. Otherwise it shares CODER-Adapter's grid."""
    tip = tip_adapter_config(recipe.released) if recipe.is_released and search == "released" else None
    if tip is None:
        return search, init, f"{search} (CODER-Adapter's grid)"
    (beta_hi, alpha_hi), (beta_steps, alpha_steps) = tip["search_scale"], tip["search_step"]
    grid = SearchGrid(beta_range=(0.1, float(beta_hi)), alpha_range=(0.1, float(alpha_hi)),
                      beta_steps=int(beta_steps), alpha_steps=int(alpha_steps), rounds=1)
    return grid, (float(tip["init_alpha"]), float(tip["init_beta"])), f"Tip-Adapter configs/{tip['config']}.yaml"


def _summary(search: dict[str, Any]) -> dict[str, Any]:
    keys = ("alpha", "beta", "T", "val_accuracy", "val_zero_shot_accuracy", "val_images", "init", "grid_source")
    return {k: search[k] for k in keys if k in search}
