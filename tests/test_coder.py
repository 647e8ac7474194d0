"""Numeric core against hand-computed cases (METHODS.md §1, §3, §7)."""

import numpy as np
import pytest
import torch

from coder_index import CoderClassifier, coder_features, heuristic_logits

# Image along x; texts at known angles, so every cosine is exact by construction.
X = np.array([[3.0, 0.0]])  # not normalised on purpose
T = np.array([[2.0, 0.0],    # cos 1.0   class 0 name
              [0.0, 5.0],    # cos 0.0   class 1 name
              [0.6, 0.8],    # cos 0.6   class 0 attribute
              [-1.0, 0.0],   # cos -1.0  class 0 analogous
              [0.8, 0.6]])   # cos 0.8   class 1 synonym
CLS = np.array([0, 1, 0, 0, 1])
KIND = ["name", "name", "attribute", "analogous", "synonym"]


def test_coder_features_are_cosines():
    np.testing.assert_allclose(coder_features(X, T), [[1.0, 0.0, 0.6, -1.0, 0.8]], atol=1e-6)
    assert coder_features(X, T).dtype == np.float32


def test_heuristic_logits_hand_computed():
    # class 0: 100 * mean(0.6, -1.0, max(1.0)) = 20; class 1 has no attribute/analogous: 100 * max(0, 0.8)
    out = heuristic_logits(coder_features(X, T), CLS, KIND, 2)
    np.testing.assert_allclose(out, [[20.0, 80.0]], atol=1e-4)
    assert out.dtype == np.float32


def test_heuristic_logits_best_name_counts_once():
    coder = np.array([[0.9, 0.1, 0.2, 0.3]])
    # one class: names 0.9 and 0.1 -> best 0.9 appended once to the attributes 0.2, 0.3
    out = heuristic_logits(coder, [0, 0, 0, 0], ["name", "synonym", "attribute", "attribute"], 1)
    np.testing.assert_allclose(out, [[100 * (0.9 + 0.2 + 0.3) / 3]], rtol=1e-6)


def test_heuristic_logits_independent_of_text_order():
    rng = np.random.default_rng(0)
    n, k, c = 7, 40, 6
    coder = rng.uniform(-1, 1, (n, k)).astype(np.float32)
    cls = np.concatenate([np.arange(c), rng.integers(0, c, k - c)])
    kinds = np.array(["name"] * c + list(rng.choice(["attribute", "analogous", "synonym", "name"], k - c)))
    perm = rng.permutation(k)
    a = heuristic_logits(coder, cls, kinds, c)
    b = heuristic_logits(coder[:, perm], cls[perm], kinds[perm], c)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    # direct per-class reference
    for j in range(c):
        m = cls == j
        names = coder[:, m & np.isin(kinds, ["name", "synonym"])]
        extra = coder[:, m & np.isin(kinds, ["attribute", "analogous"])]
        ref = 100 * np.concatenate([extra, names.max(1, keepdims=True)], 1).mean(1)
        np.testing.assert_allclose(a[:, j], ref, rtol=1e-5)


def test_chunked_classifier_equals_unfused_path():
    rng = np.random.default_rng(1)
    imgs = rng.standard_normal((53, 16))
    texts = rng.standard_normal((30, 16))
    cls = np.concatenate([np.arange(5), rng.integers(0, 5, 25)])
    kinds = ["name"] * 5 + ["attribute"] * 25
    whole = CoderClassifier(texts, cls, kinds, 5)
    assert whole.text_rows == 30 and whole.chunk_rows >= 53
    np.testing.assert_allclose(whole.logits(imgs), heuristic_logits(coder_features(imgs, texts), cls, kinds, 5),
                               rtol=1e-5, atol=1e-4)
    # every text-block size: blocks that end inside the names, on the boundary (5), inside the attributes
    for text_rows in range(1, 31):
        clf = CoderClassifier(texts, cls, kinds, 5, chunk_bytes=4 * text_rows * 8, image_rows=8)
        assert (clf.chunk_rows, clf.text_rows) == (8, text_rows)
        np.testing.assert_allclose(clf.logits(imgs), whole.logits(imgs), rtol=1e-6, atol=1e-5)


def test_torch_tensors_accepted():
    out = heuristic_logits(torch.tensor(coder_features(X, T)), torch.tensor(CLS), KIND, 2)
    np.testing.assert_allclose(out, [[20.0, 80.0]], atol=1e-4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(kinds=["name", "attribute", "attribute", "analogous", "attribute"]), "no 'name' or 'synonym'"),
    (dict(kinds=["name", "name", "colour", "analogous", "synonym"]), "unknown text kind"),
    (dict(cls=[0, 1, 0, 0, 2]), "outside"),
    (dict(cls=[0, 1, 0]), "text_class"),
    (dict(coder=np.zeros((0, 5))), "coder is empty"),
    (dict(coder=np.array([[np.nan, 0, 0, 0, 0]])), "NaN"),
    (dict(coder=np.array([[np.inf, 0, 0, 0, 0]])), "NaN or inf"),
])
def test_heuristic_logits_rejects_bad_input(kwargs, match):
    coder = kwargs.get("coder", coder_features(X, T))
    with pytest.raises(ValueError, match=match):
        heuristic_logits(coder, kwargs.get("cls", CLS), kwargs.get("kinds", KIND), 2)


@pytest.mark.parametrize("img, txt, match", [
    (np.zeros((0, 2)), T, "image_emb is empty"),
    (X, np.zeros((3, 4)) + 1, "width"),
    (np.array([[0.0, 0.0]]), T, "all zeros"),
    (X, np.array([[np.nan, 1.0]]), "text_emb contains NaN"),
    (np.ones(2), T, "2-D"),
])
def test_coder_features_rejects_bad_input(img, txt, match):
    with pytest.raises(ValueError, match=match):
        coder_features(img, txt)
