"""A persisted few-shot model: support CODERs in a FAISS index, their rows in SQLite.

    ADAPTER_DIR/
      manifest.json        index + model fingerprint, text ids checksum, shots, seed, epochs,
                           chosen alpha/beta/T and validation accuracy per adapter
      support.faiss        IndexIDMap2(IndexFlatIP) of L2-normalised support CODERs (ids = rows)
      meta.sqlite          support(id, path, label, shot, augment_epochs)
      text_ids.npy         the index text ids that are the CODER columns, in order
      support_images.npy   L2-normalised support image embeddings (the Tip-Adapter keys)
      zero_shot.npy        W_cls [C, D]: the prompt-ensembled class embeddings of o_zs

The affinity of a test image is a search of support.faiss: exact (every support entry) by default;
with ``top_k`` only the k nearest entries contribute (the row minimum for the min-max comes from a
search for the farthest entry, so it stays exact); the README states the measured accuracy cost.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np
import torch
from sqlalchemy import Column, Integer, MetaData, Table, Text, insert, select

from coder_index.core.atomic import staged_directory
from coder_index.core.damage import read_manifest, reading
from coder_index.core.errors import IndexFormatError, ModelMismatchError
from coder_index.core.validation import l2_normalize
from coder_index.methods.fewshot.adapter import CoderAdapter, TipAdapter
from coder_index.model.compute import block_budget, exact_float32, on_device
from coder_index.stores.schema import make_engine

if TYPE_CHECKING:
    from coder_index.stores.text_index import TextStore

FORMAT = "coder-index/adapter"
_meta = MetaData()
support_rows = Table(
    "support", _meta,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("path", Text, nullable=False),
    Column("label", Integer, nullable=False),
    Column("shot", Integer, nullable=False),
    Column("augment_epochs", Integer, nullable=False),
)


def text_ids_checksum(ids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(ids, dtype=np.int64).tobytes()).hexdigest()


def save_adapter(out: str | Path, manifest: dict[str, Any], text_ids: np.ndarray, support_coder: np.ndarray,
                 support_images: np.ndarray, rows: list[dict[str, Any]], zero_shot: np.ndarray) -> Path:
    """Write the adapter directory aside and rename it into place: never half-written."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise IndexFormatError(f"{out} exists and is not empty; choose a new --out for the adapter")
    with staged_directory(out) as tmp:
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(support_coder.shape[1]))
        index.add_with_ids(l2_normalize(support_coder, "support_coder"), np.arange(len(rows), dtype=np.int64))
        faiss.write_index(index, str(tmp / "support.faiss"))
        np.save(tmp / "text_ids.npy", np.asarray(text_ids, dtype=np.int64))
        np.save(tmp / "support_images.npy", np.asarray(support_images, dtype=np.float32))
        np.save(tmp / "zero_shot.npy", np.asarray(zero_shot, dtype=np.float32))
        engine = make_engine(tmp / "meta.sqlite")
        _meta.create_all(engine)
        with engine.begin() as conn:
            conn.execute(insert(support_rows), [{"id": i, **r} for i, r in enumerate(rows)])
        engine.dispose()
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    return out


class FewShotModel:
    """CODER-Adapter and Tip-Adapter over an index, loaded from an adapter directory."""

    def __init__(self, path: Path, index: TextStore, top_k: int | None = None) -> None:
        self.path = path
        self.index = index
        fix = "fit the adapter again with `coder-index fewshot fit`"
        self.manifest = read_manifest(path, FORMAT, ("model", "classes", "kinds", "adapters", "text_ids_sha256"),
                                      "a coder-index adapter", fix)
        self._check_index()
        with reading(path, "support.faiss", fix):
            self.support = faiss.read_index(str(path / "support.faiss"))
        with reading(path, "support_images.npy", fix):
            self.support_images = np.load(path / "support_images.npy", allow_pickle=False)
        with reading(path, "zero_shot.npy", fix):
            self.zs_weights = np.load(path / "zero_shot.npy", allow_pickle=False)
        with reading(path, "meta.sqlite", fix):
            if not (path / "meta.sqlite").is_file():
                raise FileNotFoundError("no such file")
            engine = make_engine(path / "meta.sqlite", read_only=True)
            try:
                with engine.connect() as conn:
                    self.labels = np.array([r[0] for r in conn.execute(select(support_rows.c.label).order_by(
                        support_rows.c.id))], dtype=np.int64)
            finally:
                engine.dispose()
        n = self.support.ntotal
        n_classes = len(index.class_names())
        if not (len(self.labels) == n == len(self.support_images)) or self.zs_weights.shape[0] != n_classes:
            raise IndexFormatError(f"{path}: support.faiss ({n}), meta.sqlite ({len(self.labels)}) and "
                                   f"support_images.npy ({len(self.support_images)}) disagree; {fix}")
        self.n_classes = len(index.class_names())
        self.top_k = top_k
        table = index.text_table(tuple(self.manifest["kinds"]))
        order = np.argsort(table.ids, kind="stable")  # the table is class-ordered; look the adapter's ids up
        pos = order[np.searchsorted(table.ids[order], self.text_ids)]
        self.text_emb = np.asarray(table.embeddings[pos])

    def _check_index(self) -> None:
        m = self.manifest
        fp = self.index.fingerprint
        if m["model"]["weights_sha256"] != fp.weights_sha256:
            raise ModelMismatchError(f"adapter {self.path} was built with model {m['model']['model']} "
                                     f"(sha256 {m['model']['weights_sha256'][:12]}…), the index uses "
                                     f"{fp.describe()}; fit a new adapter for this index")
        if m["classes"] != self.index.class_names():
            raise ModelMismatchError(f"adapter {self.path} was fitted on other classes than {self.index.path} holds")
        with reading(self.path, "text_ids.npy", "fit the adapter again with `coder-index fewshot fit`"):
            self.text_ids = np.load(self.path / "text_ids.npy", allow_pickle=False)
        table = self.index.text_table(tuple(m["kinds"]))
        present = np.isin(self.text_ids, table.ids)
        if not present.all() or text_ids_checksum(self.text_ids) != m["text_ids_sha256"]:
            raise ModelMismatchError(f"adapter {self.path} uses {int((~present).sum())} text(s) that index "
                                     f"{self.index.path} does not hold; it was fitted on another index")

    def provenance(self) -> dict[str, Any]:
        """What identifies this adapter's predictions (recorded with classify's output)."""
        h = self.manifest["adapters"]["coder-adapter"]
        return {"path": str(self.path.resolve()), "created_at": self.manifest.get("created_at"),
                "alpha": h["alpha"], "beta": h["beta"], "T": h["T"], "top_k": self.top_k}

    # ------------------------------------------------------------------ prediction
    def zero_shot(self, x: np.ndarray) -> np.ndarray:
        """o_zs = 100 * x^ @ W_cls^T with the W_cls saved at fit time (same prompts as validation)."""
        from coder_index.methods.coder import LOGIT_SCALE

        return LOGIT_SCALE * (np.asarray(x, dtype=np.float32) @ self.zs_weights.T)

    def logits(self, x: np.ndarray, method: str = "coder-adapter") -> np.ndarray:
        """Few-shot logits [N, C] for L2-normalised image embeddings."""
        if method == "coder-adapter":
            return self._coder_adapter_logits(x)  # its zero-shot term is computed on the device
        if method == "tip-adapter":
            h = self.manifest["adapters"]["tip-adapter"]
            tip = TipAdapter(h["alpha"], h["beta"], h["T"]).fit(self.support_images, self.labels, self.n_classes)
            return tip.logits(x, self.zero_shot(x))
        raise ValueError(f"unknown few-shot method {method!r}: coder-adapter or tip-adapter")

    def _coder_adapter_logits(self, x: np.ndarray) -> np.ndarray:
        """CODER-Adapter on the index's device (the CPU or a GPU, one code path): test CODER, its
        affinity to every support key (the keys are a flat, exact index: one GEMM, as a flat FAISS
        search computes), the k nearest, the min-max over the row, the cache. Rows go in blocks so the
        [n, support] affinity stays bounded; the [N, C] logits come back to the host."""
        from coder_index.methods.coder import LOGIT_SCALE

        h = self.manifest["adapters"]["coder-adapter"]
        dev = self.index.compute_device
        keys, text_t, zs_t, labels = self._on_device(dev)
        n_keys = keys.shape[0]
        k = n_keys if self.top_k is None else min(self.top_k, n_keys)
        rows = max(1, block_budget(dev, 64 << 20, 1 << 30) // (4 * max(n_keys, text_t.shape[0])))
        xt = on_device(np.ascontiguousarray(x, dtype=np.float32), dev)
        out = np.empty((len(x), self.n_classes), np.float32)
        with exact_float32():
            for s in range(0, len(x), rows):
                xb = xt[s:s + rows]
                coder = xb @ text_t.T
                norms = coder.norm(dim=1, keepdim=True)
                if bool((norms == 0).any()):
                    raise ValueError("a test CODER row is all zeros; embeddings must be non-zero vectors")
                aff = (coder / norms) @ keys.T
                sims, ids = torch.topk(aff, k, dim=1)
                lo = aff.amin(dim=1, keepdim=True)  # the farthest key: the min-max is exact for any k
                span = sims[:, :1] - lo
                a = torch.where(span > 0, (sims - lo) / span, torch.ones_like(sims))
                cache = torch.zeros((len(xb), self.n_classes), device=dev).scatter_add_(
                    1, labels[ids], torch.exp(-h["beta"] * (1.0 - a / h["T"])))
                out[s:s + len(xb)] = (LOGIT_SCALE * (xb @ zs_t.T) + h["alpha"] * cache).cpu().numpy()
        return out

    def _on_device(self, dev: torch.device) -> tuple[torch.Tensor, ...]:
        """Support keys, text embeddings, zero-shot weights and labels on ``dev``, copied there once."""
        cache = self.__dict__.setdefault("_device_arrays", {})
        if dev not in cache:
            keys = faiss.vector_to_array(faiss.downcast_index(self.support.index).codes).view(np.float32)
            cache[dev] = (on_device(keys.reshape(self.support.ntotal, -1), dev), on_device(self.text_emb, dev),
                          on_device(self.zs_weights, dev), torch.from_numpy(self.labels).to(dev))
        return cache[dev]

    def coder_adapter(self) -> CoderAdapter:
        """The numeric-core adapter with this model's keys and hyper-parameters."""
        h = self.manifest["adapters"]["coder-adapter"]
        keys = faiss.vector_to_array(faiss.downcast_index(self.support.index).codes).view(np.float32)
        return CoderAdapter(h["alpha"], h["beta"], h["T"]).fit(keys.reshape(self.support.ntotal, -1), self.labels,
                                                               self.n_classes)


def new_manifest(index: TextStore, kinds: list[str], text_ids: np.ndarray, **fields: Any) -> dict[str, Any]:
    from coder_index import __version__

    return {"format": FORMAT, "version": 1, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "generator": f"coder-index {__version__}", "index": str(index.path),
            "model": index.fingerprint.to_dict(), "classes": index.class_names(), "kinds": kinds,
            "n_texts": int(len(text_ids)), "text_ids_sha256": text_ids_checksum(text_ids), **fields}
