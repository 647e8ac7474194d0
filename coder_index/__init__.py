"""coder-index: training-free CLIP classification through cross-modal neighbour representations.

The numeric core (METHODS.md §7) is importable from here: ``coder_features``, ``heuristic_logits``,
``rerank``, ``CoderAdapter``, ``xmore_ensemble``. Names are loaded on first use, so that importing
the package (and ``coder-index --help``) does not pay for torch, open_clip or FAISS.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_EXPORTS = {
    "coder_features": ".coder", "coder_feature_chunks": ".coder", "heuristic_logits": ".coder",
    "CoderClassifier": ".coder",
    "ClipEncoder": ".encoder", "ModelFingerprint": ".encoder",
    "CoderIndexError": ".errors", "IndexFormatError": ".errors", "InputFormatError": ".errors",
    "ModelLoadError": ".errors", "ModelMismatchError": ".errors",
    "CoderAdapter": ".fewshot.adapter", "TipAdapter": ".fewshot.adapter",
    "TextIndex": ".index.text_index", "TextItem": ".index.records",
    "Predictions": ".predict", "rerank": ".rerank", "xmore_ensemble": ".xmore.ensemble",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'coder_index' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
