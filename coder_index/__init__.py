"""coder-index: training-free CLIP classification through cross-modal neighbour representations.

The numeric core (METHODS.md §7) is importable from here: ``coder_features``, ``heuristic_logits``.
"""

from .coder import CoderClassifier, coder_features, heuristic_logits
from .encoder import ClipEncoder, ModelFingerprint
from .errors import CoderIndexError, IndexFormatError, InputFormatError, ModelLoadError, ModelMismatchError
from .fewshot.adapter import CoderAdapter, TipAdapter
from .index.text_index import TextIndex, TextItem
from .predict import Predictions
from .rerank import rerank
from .xmore.ensemble import xmore_ensemble

__version__ = "0.1.0"

__all__ = [
    "ClipEncoder", "CoderClassifier", "CoderIndexError", "IndexFormatError", "InputFormatError",
    "ModelFingerprint", "ModelLoadError", "ModelMismatchError", "Predictions", "TextIndex", "TextItem",
    "CoderAdapter", "TipAdapter", "coder_features", "heuristic_logits", "rerank", "xmore_ensemble", "__version__",
]
