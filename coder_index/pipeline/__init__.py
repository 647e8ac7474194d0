"""The pipeline: work that reads inputs and writes outputs, built from the methods and stores.

Folder classification (``classify``: discover (``discover``; tar shards: ``shards``) -> read and
decode in workers (``feed``) -> encode -> score -> write rows (``output``) and embeddings
(``embeddings_out``), resumable (``runrecord``)); building an index from class lists
and text sources (``build``); labelled folders and their embeddings (``labelled``); fitting a
few-shot adapter (``fit_adapter``, ``support_views``); ingesting an X-MoRe corpus
(``ingest_corpus``). A new input format goes in ``discover`` (what to read) and ``feed`` (how).
"""
