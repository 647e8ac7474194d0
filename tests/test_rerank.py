"""rerank against a straightforward per-image implementation of METHODS.md §4."""

import numpy as np
import pytest

from coder_index import rerank


def reference_rerank(x, logits, pair_texts, top=5, gap_threshold=None):
    """One image and one pair at a time, as the released code does (sum instead of mean)."""
    out = []
    for n in range(len(x)):
        xn = x[n] / np.linalg.norm(x[n])
        order = sorted(range(logits.shape[1]), key=lambda c: (-logits[n, c], c))[:top]
        if gap_threshold is not None:
            z = np.exp(logits[n] - logits[n].max())
            p = np.sort(z / z.sum())
            if p[-1] - p[-2] >= gap_threshold:
                out.append(order[0])
                continue
        best, best_total = order[0], None
        for a in order:
            total = 0.0
            for b in order:
                if a == b:
                    continue
                tab, tba = pair_texts.get((a, b)), pair_texts.get((b, a))
                if tab is None or tba is None or len(tab) == 0 or len(tba) == 0:
                    continue
                tab = tab / np.linalg.norm(tab, axis=1, keepdims=True)
                tba = tba / np.linalg.norm(tba, axis=1, keepdims=True)
                total += np.mean(tab @ xn) - np.mean(tba @ xn)
            if best_total is None or total > best_total + 1e-9:
                best, best_total = a, total
        out.append(best)
    return np.array(out)


def random_case(seed, n=300, c=12, d=16, missing=0.3, k_max=4):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    logits = (rng.standard_normal((n, c)) * 3).astype(np.float32)
    pair_texts = {}
    for a in range(c):
        for b in range(c):
            if a != b and rng.random() > missing:
                pair_texts[(a, b)] = rng.standard_normal((rng.integers(1, k_max + 1), d)).astype(np.float32)
    return x, logits, pair_texts


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_reference_with_missing_pairs(seed):
    x, logits, pairs = random_case(seed)
    np.testing.assert_array_equal(rerank(x, logits, pairs), reference_rerank(x, logits, pairs))


@pytest.mark.parametrize("gap", [0.05, 0.3, 0.6])
def test_gate_equals_reference(gap):
    x, logits, pairs = random_case(7)
    got = rerank(x, logits, pairs, gap_threshold=gap)
    np.testing.assert_array_equal(got, reference_rerank(x, logits, pairs, gap_threshold=gap))
    # the gate really gates: the images whose softmax gap reaches it keep stage 1 (and the ungated rerank
    # moves some of them), the others are reranked as without a gate
    ungated = rerank(x, logits, pairs)
    z = logits - logits.max(axis=1, keepdims=True)
    probs = np.sort(np.exp(z) / np.exp(z).sum(axis=1, keepdims=True), axis=1)
    kept = probs[:, -1] - probs[:, -2] >= gap
    assert kept.any() and (~kept).any()
    np.testing.assert_array_equal(got[kept], logits.argmax(axis=1)[kept])
    assert (ungated[kept] != got[kept]).any()
    np.testing.assert_array_equal(got[~kept], ungated[~kept])


def test_small_top_and_chunking():
    x, logits, pairs = random_case(3, n=101)
    np.testing.assert_array_equal(rerank(x, logits, pairs, top=3, chunk=7), reference_rerank(x, logits, pairs, top=3))


def test_no_texts_keeps_stage_one_and_ties_keep_stage_one_order():
    x, logits, _ = random_case(4, n=50)
    np.testing.assert_array_equal(rerank(x, logits, {}), logits.argmax(1))
    # one-sided pairs contribute 0, as if missing
    one_sided = {(a, b): np.ones((1, 16), np.float32) for a in range(12) for b in range(12) if a < b}
    np.testing.assert_array_equal(rerank(x, logits, one_sided), logits.argmax(1))
    # identical texts both ways: every score is exactly 0, a tie everywhere
    same = {(a, b): np.ones((2, 16), np.float32) for a in range(12) for b in range(12) if a != b}
    np.testing.assert_array_equal(rerank(x, logits, same), logits.argmax(1))


def test_hand_computed_case():
    # 3 classes, stage 1 prefers 0; texts say 1 beats 0 and 1 beats 2 for this image
    x = np.array([[1.0, 0.0]])
    logits = np.array([[3.0, 2.0, 1.0]])
    e, f = np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])
    pairs = {(1, 0): e, (0, 1): f, (1, 2): e, (2, 1): f, (0, 2): e, (2, 0): f}
    # totals: class 0: (0-1) + (1-0) = 0; class 1: 1 + 1 = 2; class 2: -1 + -1 = -2
    assert rerank(x, logits, pairs, top=3).tolist() == [1]


@pytest.mark.parametrize("kwargs, match", [
    (dict(logits=np.zeros((2, 3))), "rows"),
    (dict(top=0), "top"),
    (dict(pair_texts={(0, 0): np.ones((1, 2))}), "two different classes"),
    (dict(pair_texts={(0, 9): np.ones((1, 2))}), "two different classes"),
    (dict(pair_texts={(0, 1): np.ones((1, 3))}), "width"),
    (dict(pair_texts={(0, 1): np.array([[np.nan, 1.0]])}), "NaN"),
    (dict(gap_threshold=float("nan")), "gap_threshold"),
])
def test_bad_input(kwargs, match):
    args = dict(image_emb=np.ones((1, 2)), logits=np.array([[1.0, 2.0, 3.0]]), pair_texts={})
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        rerank(**args)


def _table_from_dict(pairs, d, c):
    from coder_index.stores.pairs import PairTable

    keys = [(a, b) for (a, b), v in pairs.items() for _ in range(len(v))]
    vecs = np.concatenate([v for v in pairs.values()]) if pairs else np.zeros((0, d), np.float32)
    ka = np.array([k[0] for k in keys], np.int64)
    kb = np.array([k[1] for k in keys], np.int64)
    return PairTable.from_arrays(ka, kb, vecs, c)


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_pair_table_from_arrays_on_device_tensors_equals_every_image(seed):
    """The on-device rerank (pairs looked up as tensors, gathered by index), run on CPU tensors, picks
    the class of the per-image reference on every image, with ties broken by stage-1 order."""
    import torch

    from coder_index.stores.pairs import PairTable

    x, logits, pairs = random_case(seed, n=2000, c=30, d=16)
    logits = np.round(logits)  # many exact ties in the stage-1 order
    table = _table_from_dict(pairs, 16, 30)
    old = PairTable(pairs, 16, 30)
    np.testing.assert_array_equal(table.keys, old.keys)
    np.testing.assert_array_equal(table.diff, old.diff)
    want = reference_rerank(x, logits, pairs)
    np.testing.assert_array_equal(rerank(x, torch.from_numpy(logits), table), want)
    np.testing.assert_array_equal(rerank(x, logits, pairs, chunk=7), want)


def test_exactly_tied_totals_keep_stage_one_order():
    x = np.ones((3, 4), np.float32)
    logits = np.array([[3, 2, 1], [1, 3, 2], [2, 1, 3]], np.float32)
    same = np.eye(1, 4, dtype=np.float32)
    pairs = {(a, b): same for a in range(3) for b in range(3) if a != b}  # every score exactly 0
    np.testing.assert_array_equal(rerank(x, logits, pairs, top=3), [0, 1, 2])


def test_ties_at_the_top5_cut_follow_torch_topk_under_ties_torch():
    """Two classes exactly tied for fifth place: ties='index' keeps the lower class id, ties='torch'
    the one torch.topk keeps (the released code's order); the kept one wins the rerank here."""
    import torch

    rng = np.random.default_rng(0)
    d, c = 16, 12
    found = 0
    for _ in range(200):
        x = rng.standard_normal((1, d)).astype(np.float32)
        o = rng.standard_normal((1, c)).astype(np.float32)
        top5 = np.argsort(-o[0], kind="stable")[:5]
        out = int(rng.choice([k for k in range(c) if k not in top5]))
        o[0, out] = o[0, top5[4]]                       # an exact tie at the cut
        kept = int(torch.topk(torch.from_numpy(o), 5, dim=1, sorted=True).indices[0, 4])
        lower = min(out, int(top5[4]))
        if kept == lower:
            continue                                     # torch agrees with the index rule on this row
        found += 1
        unit = x / np.linalg.norm(x)
        pairs = {}
        for winner in (out, int(top5[4])):              # either tied class beats every other class
            for other in range(c):
                if other != winner:
                    pairs[(winner, other)] = unit
                    pairs[(other, winner)] = -unit
        assert rerank(x, o, pairs, top=5, ties="index")[0] == lower
        assert rerank(x, o, pairs, top=5, ties="torch")[0] == kept
        # the same inside a batch (torch's CPU order is per row)
        batch = np.repeat(o, 7, axis=0) + np.zeros((7, 1), np.float32)
        assert set(rerank(np.repeat(x, 7, axis=0), batch, pairs, top=5, ties="torch").tolist()) == {kept}
        if found >= 5:
            break
    assert found >= 5
    with pytest.raises(ValueError, match="ties must be"):
        rerank(x, o, pairs, top=5, ties="random")


def reference_totals(x, logits, pair_texts, top=5):
    """Per image: its top classes (stage-1 order) and each one's summed pair scores, straight from
    METHODS.md §4; None where no candidate pair has texts."""
    out = []
    for n in range(len(x)):
        xn = x[n] / np.linalg.norm(x[n])
        order = sorted(range(logits.shape[1]), key=lambda c: (-logits[n, c], c))[:top]
        totals, evidence = [], False
        for a in order:
            total = 0.0
            for b in order:
                tab, tba = pair_texts.get((a, b)), pair_texts.get((b, a))
                if a == b or tab is None or tba is None or len(tab) == 0 or len(tba) == 0:
                    continue
                evidence = True
                tab = tab / np.linalg.norm(tab, axis=1, keepdims=True)
                tba = tba / np.linalg.norm(tba, axis=1, keepdims=True)
                total += np.mean(tab @ xn) - np.mean(tba @ xn)
            totals.append(total)
        out.append((order, np.array(totals) if evidence else None))
    return out


@pytest.mark.parametrize("seed", [3, 4])
def test_decisions_and_rows_that_follow_them(seed):
    """rerank_decisions says what decided each image; rerank_rows orders and scores the row by it:
    the rerank's probability (softmax of 100 x totals) over the candidates, the final class first."""
    from coder_index.methods.predict import softmax_top_k
    from coder_index.methods.rerank import rerank_decisions
    from coder_index.methods.scorers import RERANK_SCALE, rerank_rows

    x, logits, pairs = random_case(seed, missing=0.6)
    d = rerank_decisions(x, logits, pairs)
    np.testing.assert_array_equal(d.final, rerank(x, logits, pairs))
    ids, probs = softmax_top_k(logits, 5)
    row_ids, row_probs = rerank_rows(ids, probs, d)
    for n, (order, totals) in enumerate(reference_totals(x, logits, pairs)):
        assert list(d.candidates[n]) == order
        assert row_ids[n, 0] == d.final[n]
        if totals is None:  # stage 1 decided: its order and probabilities
            assert not d.decided[n]
            pos = [list(ids[n]).index(c) for c in row_ids[n]]
            np.testing.assert_array_equal(row_probs[n], probs[n][pos])  # its own probabilities, final first
            assert sorted(pos[1:]) == pos[1:]                              # the rest in stage-1 order
            continue
        np.testing.assert_allclose(d.totals[n], totals, atol=1e-5)
        z = np.exp(RERANK_SCALE * (totals - totals.max()))
        expected = dict(zip(order, z / z.sum(), strict=True))
        assert all(abs(expected[c] - p) < 1e-5 for c, p in zip(row_ids[n], row_probs[n], strict=True))
        assert list(row_probs[n]) == sorted(row_probs[n], reverse=True)  # the bars follow the rerank
    assert d.decided.any() and (~d.decided).any()  # both kinds of rows were checked
