"""Stores: what is kept on disk and how it is read back safely. The text index (FAISS + SQLite +
manifest) and its pair texts, the X-MoRe caption corpus, the image-embedding cache, and the
check/repair of an index. A store stores; the methods take a store. Imports ``model`` and ``core``.
"""
