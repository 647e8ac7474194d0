"""Evaluation harness, a front end: labelled data -> per-method accuracy, confusions, rerank
effect, t-SNE; ``reproduce`` rebuilds the paper's tables."""
