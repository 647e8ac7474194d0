"""How tests compare scores: what the README promises, with its tolerance.

Every image gets the same computation whatever batch it is in, but float32 products are rounded
differently for different batch shapes (BLAS and oneDNN pick kernels and blockings by shape, and do
so differently on other processors), so one image's probabilities may differ by up to SCORE_ATOL
between a run with another ``--batch-size``, another engine (Ray) or the server (which batches
concurrent requests). Labels agree except where two classes are within SCORE_ATOL of each other.
Scores are never compared as formatted strings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

SCORE_ATOL = 1e-4


def assert_same_ranking(labels_a: Sequence[str], scores_a: Sequence[float], labels_b: Sequence[str],
                        scores_b: Sequence[float], atol: float = SCORE_ATOL, what: Any = "") -> None:
    """Two top-k lists of one image agree: scores within ``atol`` position by position, and a label
    that differs only where its class and the other are within ``atol`` (a near tie)."""
    assert len(labels_a) == len(labels_b), what
    np.testing.assert_allclose(np.asarray(scores_a, float), np.asarray(scores_b, float), atol=atol, rtol=0,
                               err_msg=str(what))
    score_of_a = dict(zip(labels_a, scores_a, strict=True))
    for i, (x, y) in enumerate(zip(labels_a, labels_b, strict=True)):
        if x != y:
            other = score_of_a.get(y, scores_a[-1])  # outside a's list: at most a's last score
            assert abs(float(other) - float(scores_a[i])) <= 2 * atol, (what, i, x, y, scores_a, scores_b)


def csv_ranking(row: dict[str, str]) -> tuple[list[str], list[float]]:
    """(labels, scores) of a predictions CSV row (label, score, label_2, score_2, ...)."""
    labels, scores = [row["label"]], [float(row["score"])]
    i = 2
    while f"label_{i}" in row and row[f"label_{i}"] != "":
        labels.append(row[f"label_{i}"])
        scores.append(float(row[f"score_{i}"]))
        i += 1
    return labels, scores


def _ranked_keys(items: list[Any]) -> tuple[str, str] | None:
    """(name key, score key) when ``items`` is a best-first list of scored things (texts, classes)."""
    if not items or not all(isinstance(x, dict) for x in items):
        return None
    for name in ("text", "class", "label"):
        for value in ("cosine", "score"):
            if all(name in x and isinstance(x.get(value), float) for x in items):
                return name, value
    return None


def assert_close_tree(a: Any, b: Any, atol: float = SCORE_ATOL, where: str = "$") -> None:
    """Two JSON-like values are equal, floats within ``atol`` (not rounded to a number of digits)."""
    if isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, (int, float)) and isinstance(b, (int, float)), where
        assert abs(a - b) <= atol, (where, a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, a, b)
        for k in a:
            assert_close_tree(a[k], b[k], atol, f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), (where, a, b)
        ranked = _ranked_keys(a)
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if ranked and x[ranked[0]] != y[ranked[0]]:   # a best-first list whose order may flip at a near tie
                name, value = ranked
                assert abs(x[value] - y[value]) <= atol, (f"{where}[{i}]", x, y)
                twin = next((z for z in a if z[name] == y[name]), None)
                assert twin is None or abs(twin[value] - x[value]) <= 2 * atol, (f"{where}[{i}]", x, y)
                continue
            assert_close_tree(x, y, atol, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)
