"""What every X-MoRe corpus shares (a local one, one by reference, a kNN service): the format's names,
the model check, the search, and X-MoRe's normalisers kept beside the corpus. Its own module, so
that the corpora that refer elsewhere (``corpus_reference``, ``corpus_service``) build on it
without importing ``corpus``, which opens them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from coder_index.core.errors import CoderIndexError, ModelMismatchError

if TYPE_CHECKING:
    from coder_index.model.encoder import ModelFingerprint

FORMAT = "coder-index/corpus"
CALIBRATION_FILE = "calibration.json"
CAPTION_TEMPLATE = "a photo of a {caption}"


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32, contiguous; a zero row stays zero)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def keep_nprobe(index: faiss.Index, nprobe: int | None) -> None:
    """Set an IVF index's lists searched per query before it is written (FAISS keeps it in the file;
    its own default, 1, finds few of the true neighbours)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and nprobe is not None:
        ivf.nprobe = min(int(nprobe), ivf.nlist)


class CorpusBase:
    """What every corpus does the same way: the model check, the search, the normalisers kept beside
    it. A subclass sets ``path``, ``manifest``, ``index``, ``device`` and reads its captions."""

    path: Path
    manifest: dict[str, Any]
    index: Any
    device: Any = None
    _searcher: Any = None

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def check_model(self, fp: ModelFingerprint) -> None:
        mine = self.manifest["model"]
        if mine["weights_sha256"] != fp.weights_sha256:
            raise ModelMismatchError(f"corpus {self.path} holds embeddings of CLIP model {mine['model']} "
                                     f"(sha256 {mine['weights_sha256'][:12]}…), not of {fp.describe()}; "
                                     "build a corpus with this model")

    def set_nprobe(self, nprobe: int) -> None:
        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None:
            ivf.nprobe = nprobe
            self._searcher = None  # a GPU copy is made again with the new setting

    def search(self, image_emb: np.ndarray, k: int = 16) -> tuple[np.ndarray, np.ndarray]:
        """(cosines [N, k], row ids [N, k]) of the nearest corpus images (-1 where an approximate index
        found fewer than k)."""
        if self._searcher is None:
            from coder_index.model.faiss_gpu import index_for_device

            self._searcher = index_for_device(self.index, self.device)
        return self._searcher.search(normalize_rows(image_emb), min(k, self.ntotal))

    # ------------------------------------------------------------------ calibration
    def calibration(self, key: dict[str, Any]) -> tuple[float, float] | None:
        """The normalisers kept for ``key``, or None."""
        path = self.path / CALIBRATION_FILE
        try:
            kept = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        for entry in kept.get("entries", []) if isinstance(kept, dict) else []:
            if isinstance(entry, dict) and entry.get("key") == key:
                values = entry.get("normalizers")
                if isinstance(values, list) and len(values) == 2 and all(isinstance(v, float) and v > 0
                                                                          for v in values):
                    return float(values[0]), float(values[1])
        return None

    def keep_calibration(self, key: dict[str, Any], values: tuple[float, float]) -> None:
        """Keep normalisers beside the corpus (locked, written aside and renamed); a corpus that cannot
        be written keeps nothing (they are computed again, the same, by the next process)."""
        from coder_index.core.atomic import atomic_write_json
        from coder_index.core.locking import FileLock

        path = self.path / CALIBRATION_FILE
        try:
            with FileLock(self.path / ".calibration.lock", f"the corpus {self.path}", wait=60, remove=True):
                try:
                    kept = json.loads(path.read_text(encoding="utf-8"))
                    entries = [e for e in kept.get("entries", []) if isinstance(e, dict) and e.get("key") != key]
                except (OSError, ValueError, AttributeError):
                    entries = []
                atomic_write_json(path, {"entries": [*entries, {"key": key, "normalizers": list(values)}]})
        except (OSError, CoderIndexError):
            pass
