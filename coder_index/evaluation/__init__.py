"""Evaluation harness: labelled data -> per-method accuracy, confusions, rerank effect, t-SNE."""
