"""Folder classification: discover -> decode/preprocess in workers -> encode -> CODER -> write."""
