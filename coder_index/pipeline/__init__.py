"""The pipeline: work that reads inputs and writes outputs, built from the methods and stores.

Classification (``classify``: a source's units (``sources``: folders, file lists, shards, parquet),
minus what OUT holds -> an engine (``local_engine``; Ray's in ``engines``) that reads and decodes in
workers (``feed``, ``encode_images``), encodes and scores -> the run's sink (``run_sink``: rows
(``output``), errors, read failures to retry, units done) and embeddings (``embeddings_out``),
resumable (``runrecord``)); building an index from class lists and text sources (``build``);
labelled data and their embeddings (``labelled``); fitting a few-shot adapter (``fit_adapter``,
``support_views``); ingesting an X-MoRe corpus (``ingest_corpus``). A new input format is one module
of ``sources`` (and a line in ``sources/resolve.py``).
"""
