"""The model: the CLIP encoder (open_clip names, pretrained tags, local checkpoints), its hub and
checkpoint loading, where numeric work runs (device, float32 exactness, memory blocks), and FAISS on
a GPU. Imports only ``core``.
"""
