"""X-MoRe: retrieval-augmented zero-shot from an external image-text corpus (METHODS.md §6): the
ensemble of the image and caption views (``ensemble``) and the scorer over a corpus store
(``predict``). The corpus itself is ``stores.corpus``; ingesting one is ``pipeline.ingest_corpus``."""
