"""Writes a tiny, randomly initialised open_clip model in the layout of open_clip repositories on
the Hugging Face hub (open_clip_config.json + open_clip_pytorch_model.bin), so that tests load it
through the same `local-dir:` path a user's downloaded model takes."""

from __future__ import annotations

import json
from pathlib import Path

TINY_CONFIG = {
    "model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    },
    "preprocess_cfg": {
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
    },
}


def write_tiny_model(directory: Path, seed: int = 0, config: dict | None = None) -> str:
    """Create the model files in ``directory`` and return the ``local-dir:`` model name."""
    import open_clip
    import torch

    cfg = config or TINY_CONFIG
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg["model_cfg"])
    # Random init gives near-identical text embeddings; widen the token embeddings so texts differ.
    with torch.no_grad():
        model.token_embedding.weight.normal_(0, 1.0)
    (directory / "open_clip_config.json").write_text(json.dumps(cfg))
    torch.save(model.state_dict(), directory / "open_clip_pytorch_model.bin")
    return f"local-dir:{directory}"
