"""Data files shipped with coder-index (prompt templates). Installed as ``coder_index.data``."""
