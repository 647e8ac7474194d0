"""The methods (METHODS.md): CODER and its heuristic logits, candidate classes for large
vocabularies, the one-to-one rerank (CODER*) with pair texts generated on demand, zero-shot prompt
ensembles, the few-shot adapters, the X-MoRe ensemble, explanations, and the scorers that turn image
embeddings into predictions for the pipeline. ``TextIndex`` (``text_index``) is the text store with
these methods attached. Methods take a store; they never read folders or write outputs.

A new scorer goes in ``scorers.py`` (and ``scorer_spec.py`` builds it from options).
"""
