"""coder-index: training-free CLIP classification through cross-modal neighbour representations.

The numeric core (METHODS.md §7) is importable from here: ``coder_features``, ``heuristic_logits``,
``rerank``, ``CoderAdapter``, ``xmore_ensemble``. Names are loaded on first use, so that importing
the package (and ``coder-index --help``) does not pay for torch, open_clip or FAISS.
"""

from __future__ import annotations

import importlib
from typing import Any

from coder_index import _moved

__version__ = "0.4.0"

_EXPORTS = {
    "coder_features": ".methods.coder", "coder_feature_chunks": ".methods.coder",
    "heuristic_logits": ".methods.coder", "CoderClassifier": ".methods.coder",
    "ClipEncoder": ".model.encoder", "ModelFingerprint": ".model.encoder",
    "CoderIndexError": ".core.errors", "IndexFormatError": ".core.errors", "InputFormatError": ".core.errors",
    "ModelLoadError": ".core.errors", "ModelMismatchError": ".core.errors",
    "CoderAdapter": ".methods.fewshot.adapter", "TipAdapter": ".methods.fewshot.adapter",
    "TextIndex": ".methods.text_index", "TextStore": ".stores.text_index", "TextItem": ".core.records",
    "Predictions": ".methods.predict", "rerank": ".methods.rerank", "xmore_ensemble": ".methods.xmore.ensemble",
}

__all__ = [*_EXPORTS, "__version__"]

_moved.install()  # coder-index 0.2's import paths, with a DeprecationWarning, until 0.4


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'coder_index' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
