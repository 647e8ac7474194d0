"""Persistent stores: the text index directory (FAISS + SQLite + manifest)."""
