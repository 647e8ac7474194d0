"""Scale without Ray: candidate classes for huge vocabularies, products with the memory-mapped text
matrix that never copy it, row-blocked heuristic logits, and the streaming classify (chunks)."""

from __future__ import annotations

import csv
import json
import mmap
import tracemalloc

import numpy as np
import pytest

from coder_index.methods.candidates import CandidateClassifier
from coder_index.methods.coder import CoderClassifier, coder_feature_chunks, coder_features, heuristic_logits

from conftest import run_cli
from images import BAD, GOOD, make_messy_folder

run = run_cli  # conftest's: the command line in this process, as a user types it


def unit(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)


def vocabulary(rng: np.random.Generator, n_classes: int, d: int = 32):
    """Texts in a shuffled order; classes with 1-3 name texts (names and synonyms) and 0-5 extra texts."""
    names = rng.integers(1, 4, n_classes)
    extras = rng.integers(0, 6, n_classes)
    cls = np.concatenate([np.repeat(np.arange(n_classes), names), np.repeat(np.arange(n_classes), extras)])
    kinds = np.array(["name"] * names.sum() + ["attribute"] * extras.sum(), dtype=object)
    kinds[: names.sum()][rng.random(names.sum()) < 0.3] = "synonym"
    centre = unit(rng.standard_normal((n_classes, d)))
    w = unit(centre[cls] + 0.8 / np.sqrt(d) * rng.standard_normal((len(cls), d)))
    perm = rng.permutation(len(cls))
    return w[perm], cls[perm], kinds[perm], centre


@pytest.mark.parametrize("seed", range(4))
def test_candidates_with_every_class_equal_the_dense_logits(seed):
    rng = np.random.default_rng(seed)
    w, cls, kinds, centre = vocabulary(rng, 40)
    x = unit(rng.standard_normal((30, w.shape[1])))
    dense = CoderClassifier(w, cls, kinds, 40)
    full = CandidateClassifier(dense, 40).logits(x, normalized=True)
    np.testing.assert_allclose(full, dense.logits(x, normalized=True), atol=2e-4)
    # the compact form holds the same numbers for the classes it names
    cand, vals = CandidateClassifier(dense, 7).candidate_logits(x, normalized=True)
    np.testing.assert_allclose(vals, np.take_along_axis(dense.logits(x, normalized=True), cand, 1), atol=2e-4)
    assert (np.sort(cand, axis=1)[:, 1:] != np.sort(cand, axis=1)[:, :-1]).all(), "a class named twice"


def test_candidates_agree_with_the_dense_top1_on_a_clustered_vocabulary():
    rng = np.random.default_rng(7)
    w, cls, kinds, centre = vocabulary(rng, 600, d=64)
    truth = rng.integers(0, 600, 400)
    x = unit(centre[truth] + 1.5 / 8 * rng.standard_normal((400, 64)))  # dense top-1 right ~88%
    dense = CoderClassifier(w, cls, kinds, 600)
    top = dense.logits(x, normalized=True).argmax(1)
    for m, floor in ((16, 0.99), (64, 0.995)):
        pred = CandidateClassifier(dense, m).logits(x, normalized=True)
        assert np.isinf(pred).sum(axis=1).tolist() == [600 - m] * 400  # -inf outside the candidates
        assert (pred.argmax(1) == top).mean() >= floor, m


@pytest.mark.parametrize("m", [0, -3, True, 2.5, "8"])
def test_candidates_refuse_a_bad_count(m):
    rng = np.random.default_rng(0)
    w, cls, kinds, _ = vocabulary(rng, 5)
    with pytest.raises(ValueError, match="positive integer"):
        CandidateClassifier(CoderClassifier(w, cls, kinds, 5), m)


def _unaligned_readonly(a: np.ndarray, tmp_path) -> np.ndarray:
    """``a`` as a read-only memory map whose first float sits 2 bytes past an aligned address, as
    the matrix inside texts.faiss does (its FAISS header)."""
    path = tmp_path / "m.bin"
    path.write_bytes(b"\0\0" + a.astype(np.float32).tobytes())
    f = open(path, "rb")  # noqa: SIM115 - the map keeps it alive for the test
    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    out = np.frombuffer(mm, dtype=np.float32, offset=2).reshape(a.shape)
    assert not out.flags.aligned and not out.flags.writeable
    return out


def _numpy_peak(fn) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_products_with_the_mapped_matrix_never_copy_it(tmp_path):
    """NumPy copies an unaligned operand whole before BLAS; the index's matrix is one, so every product
    with it must go through torch (numbers equal, no matrix-sized allocation)."""
    rng = np.random.default_rng(1)
    k, d, n_classes = 20_000, 64, 500
    # the index's order (coder.TextLayout): a name per class, then the extra texts class by class
    cls = np.concatenate([np.arange(n_classes), np.sort(rng.integers(0, n_classes, k - n_classes))])
    kinds = np.array(["name"] * n_classes + ["attribute"] * (k - n_classes), dtype=object)
    aligned = unit(rng.standard_normal((k, d)))
    mapped = _unaligned_readonly(aligned, tmp_path)
    x = unit(rng.standard_normal((40, d)))
    matrix = k * d * 4

    clf = CoderClassifier(mapped, cls, kinds, n_classes)
    assert clf.text_emb is mapped or np.shares_memory(clf.text_emb, mapped)
    got = {}
    assert _numpy_peak(lambda: got.setdefault("logits", clf.logits(x, normalized=True))) < matrix / 2
    ref = CoderClassifier(aligned, cls, kinds, n_classes).logits(x, normalized=True)
    np.testing.assert_allclose(got["logits"], ref, atol=1e-3)
    assert _numpy_peak(lambda: got.setdefault("cand", CandidateClassifier(clf, 8).logits(x, normalized=True))) \
        < matrix / 2
    assert (got["cand"].argmax(1) == ref.argmax(1)).mean() > 0.9
    assert _numpy_peak(lambda: got.setdefault("feats", coder_features(x, mapped))) < matrix / 2
    np.testing.assert_allclose(got["feats"], x @ aligned.T, atol=1e-5)
    blocks = list(coder_feature_chunks(x, mapped, chunk_bytes=k * 4 * 16))
    assert [s for s, _ in blocks] == [0, 16, 32]
    np.testing.assert_allclose(np.concatenate([b for _, b in blocks]), x @ aligned.T, atol=1e-5)


def test_heuristic_logits_works_in_row_blocks():
    """Equal to the fused classifier for a shuffled layout, without a transposed copy of the input."""
    rng = np.random.default_rng(2)
    w, cls, kinds, _ = vocabulary(rng, 30)
    x = unit(rng.standard_normal((20_000, w.shape[1])))  # several blocks of 4096 rows
    sims = coder_features(x, w)
    got = {}
    peak = _numpy_peak(lambda: got.setdefault("h", heuristic_logits(sims, cls, kinds, 30)))
    np.testing.assert_allclose(got["h"], CoderClassifier(w, cls, kinds, 30).logits(x), atol=1e-3)
    assert peak < 0.75 * sims.nbytes, f"heuristic_logits allocated {peak} bytes for a {sims.nbytes}-byte input"


# --- the CLI ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("scale-cli")
    classes = root / "classes.txt"
    classes.write_text("Abyssinian\nBengal\nbeagle\npug\nsamoyed\n")
    run("build", root / "idx", "--classes", classes, "--model", tiny_model, "--llm", "none", "-q")
    return root / "idx"


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    return make_messy_folder(tmp_path_factory.mktemp("messy"))


def _rows(path):
    with open(path, newline="") as f:
        return {r["path"]: r for r in csv.DictReader(f)}


def test_candidates_flag_on_the_cli(index_dir, messy, tmp_path):
    dense, every, few = tmp_path / "dense.csv", tmp_path / "every.csv", tmp_path / "few.csv"
    run("classify", messy, "--index", index_dir, "--out", dense, "--top-k", "3", "-q")
    run("classify", messy, "--index", index_dir, "--out", every, "--top-k", "3", "--candidates", "5", "-q")
    rows_dense, rows_every = _rows(dense), _rows(every)
    assert rows_dense.keys() == rows_every.keys() and len(rows_dense) == len(GOOD)
    for p, r in rows_dense.items():
        assert r["label"] == rows_every[p]["label"]
        assert abs(float(r["score"]) - float(rows_every[p]["score"])) < 1e-4
    res = run("classify", messy, "--index", index_dir, "--out", few, "--top-k", "3", "--candidates", "2")
    assert "--top-k 3 is more than --candidates 2" in res.output
    sidecar = json.loads(few.with_name(few.name + ".run.json").read_text())
    assert json.dumps(sidecar).count('"candidates": 2') == 1
    with open(few, newline="") as f:
        header = next(csv.reader(f))
    assert not any(h.startswith("top3") for h in header)
    # a resumed run with another candidate count would mix settings: refused
    res = run("classify", messy, "--index", index_dir, "--out", few, "--top-k", "2", "--candidates", "3", ok=False)
    assert res.exit_code != 0 and "candidates" in res.output
    for bad in ("0", "-2", "many"):
        res = run("classify", messy, "--index", index_dir, "--out", tmp_path / "x.csv", "--candidates", bad, ok=False)
        assert res.exit_code == 2 and "--candidates" in res.output


def test_streamed_discovery_in_small_chunks_writes_the_same_rows(index_dir, messy, tmp_path, monkeypatch):
    """The folder is walked and checked against the done-set a chunk at a time; with chunks of 3
    files the rows, the errors file and the rerun summary are those of one chunk."""
    import coder_index.pipeline.classify as classify_mod

    whole = tmp_path / "whole.csv"
    run("classify", messy, "--index", index_dir, "--out", whole, "-q")
    monkeypatch.setattr(classify_mod, "PENDING_CHUNK", 3)
    small = tmp_path / "small.csv"
    run("classify", messy, "--index", index_dir, "--out", small, "-q")
    a, b = _rows(whole), _rows(small)
    assert a.keys() == b.keys()
    assert all(a[p]["label"] == b[p]["label"] for p in a)
    errors = sorted(small.parent.glob(small.name + ".errors*"))
    assert errors, "the unreadable files are reported"
    reported = errors[0].read_text()
    assert all(name in reported for name in BAD)
    again = run("classify", messy, "--index", index_dir, "--out", small)
    assert f"{len(GOOD) + len(BAD)} done in earlier runs" in again.output, again.output
    assert errors[0].read_text() == reported, "a rerun with nothing to do leaves the errors file as it was"
    assert _rows(small) == b


def test_text_encoding_in_groups_keeps_input_order(encoder, monkeypatch):
    """Texts are sorted by length across the whole input and tokenized a group at a time; the
    embeddings still come back in input order, equal to encoding each text alone."""
    import coder_index.model.encoder as encoder_mod

    texts = [f"a photo of a {'very ' * (i % 7)}thing number {i}" for i in range(53)][::-1] + ["x", "x"]
    alone = np.concatenate([encoder.encode_texts([t]) for t in texts])
    monkeypatch.setattr(encoder_mod, "TEXT_GROUP", 10)
    seen = []
    got = encoder.encode_texts(texts, batch_size=4, progress=seen.append)
    np.testing.assert_allclose(got, alone, atol=1e-5)
    assert sum(seen) == len(texts) and max(seen) <= 4


@pytest.mark.parametrize("block_bytes", [8, 8 * 40, 8 * 40 * 3, 16 << 20])
def test_softmax_top_k_is_the_full_softmax_then_top_k(block_bytes):
    """The scorer's probabilities without an [N, C] float64 array: the same classes and the same
    probabilities (float64 rounding), for blocks of one row, one row exactly, a few rows and all rows;
    ties (equal logits) keep the lower id."""
    from coder_index.methods.predict import softmax, softmax_top_k, top_k

    rng = np.random.default_rng(3)
    logits = (rng.standard_normal((23, 40)) * 30).astype(np.float32)
    logits[:, 7] = logits[:, 3]            # a tie inside the top k of some rows
    logits[5] = logits[5, 0]               # a row of one value
    logits[6, [1, 2, 9]] = logits[6].max()  # a tie at the top
    for k in (1, 5, 40):
        ids, probs = softmax_top_k(logits, k, block_bytes=block_bytes)
        want_probs = softmax(logits.astype(np.float64))
        want_ids, want_vals = top_k(want_probs, k)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_allclose(probs, want_vals, rtol=1e-12, atol=1e-300)
        assert probs.dtype == np.float64


def test_softmax_top_k_holds_a_block_not_the_matrix():
    from coder_index.methods.predict import softmax_top_k

    logits = np.random.default_rng(4).standard_normal((256, 20_000)).astype(np.float32)
    tracemalloc.start()
    try:
        softmax_top_k(logits, 5, block_bytes=1 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"{peak} bytes: more than a block (the float64 probabilities are {256 * 20_000 * 8})"


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * mmap.PAGESIZE


def test_release_pages_drops_a_read_memory_map_from_resident_memory(tmp_path):
    from coder_index.core.pages import release_pages

    path = tmp_path / "m.f32"
    rows = np.random.default_rng(0).standard_normal((32768, 512)).astype(np.float32)  # 64 MB
    rows.tofile(path)
    m = np.memmap(path, dtype=np.float32, mode="r", offset=4 * 512 * 3, shape=(32765, 512))  # unaligned offset
    before = _resident_bytes()
    total = float(m.sum(dtype=np.float64))  # every page read
    after_read = _resident_bytes()
    assert after_read - before > 48 << 20
    view = np.asarray(m)  # a plain ndarray view, as the checks see the index's matrix
    for s in range(0, len(m), 1000):  # blocks that start and end inside pages
        release_pages(view[s:s + 1000])
    assert _resident_bytes() - before < 8 << 20
    np.testing.assert_array_equal(m[100:200], rows[103:203])  # the data reads back unchanged
    assert float(m.sum(dtype=np.float64)) == total
    plain = rows.copy()
    release_pages(plain)  # not a memory map: nothing happens
    np.testing.assert_array_equal(plain, rows)
