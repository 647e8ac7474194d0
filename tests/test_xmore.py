"""X-MoRe: the ensemble formula, the corpus index (LAION layout and captioned folders), the flow."""

import csv
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from coder_index import ModelMismatchError, TextIndex, xmore_ensemble
from coder_index.core.decode import load_image
from coder_index.core.errors import InputFormatError
from coder_index.methods.xmore.predict import XMore
from coder_index.pipeline.ingest_corpus import ingest_folder, ingest_laion
from coder_index.stores.corpus import Corpus
from coder_index_cli.main import cli

from images import GOOD, make_messy_folder


def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def direct(li, lc, running=False):
    n, c = li.shape
    p_img = np.array([softmax(r) for r in li])
    p_cap = np.array([np.mean([softmax(r) for r in lc[i]], axis=0) for i in range(n)])
    conf = lambda p: 1 + (p * np.log(p)).sum() / np.log(c)  # noqa: E731
    ci, cc = np.array([conf(p) for p in p_img]), np.array([conf(p) for p in p_cap])
    out = np.zeros((n, c))
    for i in range(n):
        ni, nc = (ci[: i + 1].sum(), cc[: i + 1].sum()) if running else (ci.mean(), cc.mean())
        out[i] = ci[i] / ni * p_img[i] + cc[i] / nc * p_cap[i]
    return out


@pytest.fixture
def logits():
    rng = np.random.default_rng(0)
    return rng.standard_normal((9, 6)) * 3, rng.standard_normal((9, 4, 6)) * 3


def test_formula(logits):
    li, lc = logits
    np.testing.assert_allclose(xmore_ensemble(li, lc), direct(li, lc), rtol=1e-5)


def test_order_independent(logits):
    li, lc = logits
    perm = np.random.default_rng(1).permutation(len(li))
    np.testing.assert_allclose(xmore_ensemble(li[perm], lc[perm]), xmore_ensemble(li, lc)[perm], rtol=1e-6)
    running = xmore_ensemble(li, lc, normalizer="running")
    assert not np.allclose(xmore_ensemble(li[perm], lc[perm], normalizer="running"), running[perm])


def test_running_sum_option_matches_its_definition(logits):
    li, lc = logits
    np.testing.assert_allclose(xmore_ensemble(li, lc, normalizer="running"), direct(li, lc, running=True), rtol=1e-5)


def test_calibration_normalizers_and_bad_input(logits):
    li, lc = logits
    a = xmore_ensemble(li[:3], lc[:3], normalizer=(0.5, 0.25))
    assert a.shape == (3, 6)
    with pytest.raises(ValueError, match="caption_logits"):
        xmore_ensemble(li, lc[:, :, :5])
    with pytest.raises(ValueError, match="NaN"):
        xmore_ensemble(np.full((1, 6), np.nan), lc[:1])
    with pytest.raises(ValueError, match="normalizer"):
        xmore_ensemble(li, lc, normalizer="sometimes")


def write_laion(root, shards, dim, seed=0, null_caption_in=None, short_metadata_in=None):
    rng = np.random.default_rng(seed)
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    all_emb, all_caps = [], []
    for s, n in enumerate(shards):
        emb = rng.standard_normal((n, dim)).astype(np.float32)
        caps = [f"shard {s} thing {i}" for i in range(n)]
        if s == null_caption_in:
            caps[3] = None
        meta_rows = n - 1 if s == short_metadata_in else n
        np.save(root / "img_emb" / f"img_emb_{s}.npy", emb)
        pq.write_table(pa.table({"caption": caps[:meta_rows], "url": [f"http://x/{s}/{i}" for i in range(meta_rows)],
                                 "key": [f"{s:05d}{i:04d}" for i in range(meta_rows)]}),
                       root / "metadata" / f"metadata_{s}.parquet")
        all_emb.append(emb)
        all_caps += caps
    return np.concatenate(all_emb), all_caps


def test_laion_ingest_and_flat_equals_brute_force(tmp_path, encoder):
    emb, caps = write_laion(tmp_path / "laion", [50, 30, 40], encoder.embed_dim)
    m = ingest_laion(tmp_path / "corpus", encoder, tmp_path / "laion", chunk=16)
    assert m["rows"] == 120
    corpus = Corpus(tmp_path / "corpus", encoder.fingerprint)
    q = np.random.default_rng(5).standard_normal((7, encoder.embed_dim)).astype(np.float32)
    sims, ids = corpus.search(q, 16)
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    np.testing.assert_array_equal(ids, np.argsort(-(qn @ e.T), axis=1)[:, :16])
    np.testing.assert_allclose(sims, np.sort(qn @ e.T, axis=1)[:, ::-1][:, :16], atol=1e-5)
    rows = corpus.rows(ids[0].tolist())
    assert [rows[int(i)]["caption"] for i in ids[0][:3]] == [caps[int(i)] for i in ids[0][:3]]
    # traceable: each hit keeps the parquet's url and key
    first = int(ids[0][0])
    shard, local = (0, first) if first < 50 else (1, first - 50) if first < 80 else (2, first - 80)
    assert rows[first]["url"] == f"http://x/{shard}/{local}" and rows[first]["key"] == f"{shard:05d}{local:04d}"
    expected = encoder.encode_texts([f"a photo of a {caps[int(i)]}" for i in ids[0]])
    np.testing.assert_allclose(corpus.caption_embeddings(ids)[0], expected, atol=1e-5)


@pytest.mark.parametrize("bad, match", [
    ({"null_caption_in": 1}, "without a caption"),
    ({"short_metadata_in": 2}, "not row-aligned"),
])
def test_bad_shards_leave_nothing(tmp_path, encoder, bad, match):
    write_laion(tmp_path / "laion", [20, 20, 20], encoder.embed_dim, **bad)
    with pytest.raises(InputFormatError, match=match):
        ingest_laion(tmp_path / "corpus", encoder, tmp_path / "laion")
    assert not (tmp_path / "corpus").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".corpus")]


def test_ivf_factory_is_trained(tmp_path, encoder):
    write_laion(tmp_path / "laion", [200, 100], encoder.embed_dim)
    m = ingest_laion(tmp_path / "c", encoder, tmp_path / "laion", factory="IVF4,Flat", train_size=150)
    assert m["factory"] == "IVF4,Flat" and m["sources"]["train_rows"] == 150
    corpus = Corpus(tmp_path / "c")
    corpus.set_nprobe(4)  # all lists: exact
    sims, ids = corpus.search(np.ones((2, encoder.embed_dim), np.float32), 5)
    assert (ids >= 0).all() and (np.diff(sims, axis=1) <= 1e-6).all()


def test_captioned_folder_with_a_corrupt_image(tmp_path, encoder):
    folder = make_messy_folder(tmp_path / "imgs")
    with open(tmp_path / "captions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption"])
        for g in GOOD[:4] + ["corrupt.jpg"]:
            w.writerow([g, f"caption of {g}"])
    m = ingest_folder(tmp_path / "c1", encoder, folder, tmp_path / "captions.csv", workers=0)
    assert m["rows"] == 4 and [p for p, _ in m["skipped"]] == ["corrupt.jpg"]
    corpus = Corpus(tmp_path / "c1")
    x = encoder.encode_images([load_image(folder / GOOD[2])])
    sims, ids = corpus.search(x, 1)
    assert corpus.rows([int(ids[0, 0])])[int(ids[0, 0])] == {"caption": f"caption of {GOOD[2]}", "source": GOOD[2],
                                                            "image_path": GOOD[2]}
    assert sims[0, 0] == pytest.approx(1.0, abs=1e-5)
    # img2dataset sidecar captions and .json metadata (key, url)
    for i, g in enumerate(GOOD[:3]):
        (folder / g).with_suffix(".txt").write_text(f"sidecar {g}")
        (folder / g).with_suffix(".json").write_text(json.dumps({"key": f"00000{i}", "url": f"https://img/{i}.jpg",
                                                                 "caption": f"sidecar {g}"}))
    assert ingest_folder(tmp_path / "c2", encoder, folder, workers=0)["rows"] == 3
    hits = Corpus(tmp_path / "c2").rows([0, 1, 2])
    assert {h["key"] for h in hits.values()} == {"000000", "000001", "000002"}
    assert {h["url"] for h in hits.values()} == {f"https://img/{i}.jpg" for i in range(3)}


def test_model_mismatch_refused(tmp_path, encoder, other_tiny_model):
    from coder_index import ClipEncoder

    write_laion(tmp_path / "laion", [10], encoder.embed_dim)
    ingest_laion(tmp_path / "c", encoder, tmp_path / "laion")
    with pytest.raises(ModelMismatchError, match="build a corpus with this model"):
        Corpus(tmp_path / "c", ClipEncoder(other_tiny_model).fingerprint)


@pytest.fixture
def xenv(tmp_path, tiny_model, encoder):
    classes = tmp_path / "classes.txt"
    classes.write_text("Abyssinian\nBengal\nbeagle\npug\nsamoyed\n")
    assert CliRunner().invoke(cli, ["build", str(tmp_path / "idx"), "--classes", str(classes), "--model",
                                    tiny_model]).exit_code == 0
    write_laion(tmp_path / "laion", [60, 60], encoder.embed_dim)
    res = CliRunner().invoke(cli, ["corpus", "build", str(tmp_path / "corpus"), "--embeddings",
                                   str(tmp_path / "laion"), "--index", str(tmp_path / "idx")])
    assert res.exit_code == 0, res.output
    return tmp_path, make_messy_folder(tmp_path / "imgs")


@pytest.mark.parametrize("normalizer", ["corpus", "set"])
@pytest.mark.parametrize("method", ["xmore", "coder+xmore"])
def test_classify_with_corpus_matches_direct_computation(xenv, method, normalizer):
    """classify's labels are XMore.predict's, with the corpus's normalisers (the default: nothing of the
    run is kept) or the set's (every image of the run; the record keeps them, for resume and explain)."""
    tmp_path, folder = xenv
    res = CliRunner().invoke(cli, ["classify", str(folder), "--index", str(tmp_path / "idx"), "--out",
                                   str(tmp_path / "p.csv"), "--corpus", str(tmp_path / "corpus"), "--method", method,
                                   "--retrieve-k", "8", "--xmore-normalizer", normalizer, "--workers", "0", "-q"])
    assert res.exit_code == 0, res.output
    with open(tmp_path / "p.csv", newline="") as f:
        rows = {r["path"].split("/imgs/")[1]: r for r in csv.DictReader(f)}
    assert set(rows) == set(GOOD) and {r["method"] for r in rows.values()} == {method}
    index = TextIndex.open(tmp_path / "idx")
    x = index.encoder.encode_images([load_image(folder / g) for g in sorted(GOOD)])
    xmore = XMore(index, Corpus(tmp_path / "corpus"), k=8)
    expected = xmore.corpus_normalizers(method) if normalizer == "corpus" else xmore.normalizers(x, method)
    probs = xmore.predict(x, method, expected)
    names = index.class_names()
    assert [rows[g]["label"] for g in sorted(GOOD)] == [names[i] for i in probs.argmax(1)]
    top = (probs / probs.sum(1, keepdims=True)).max(1)  # the scorer scales each row to sum to 1
    assert [float(rows[g]["score"]) for g in sorted(GOOD)] == pytest.approx(list(top), abs=1e-4)
    side = json.loads((tmp_path / "p.csv.run.json").read_text())
    assert side["provenance"]["method"] == method
    if normalizer == "set":
        assert side["state"]["normalizer_images"] == len(GOOD)
        assert side["state"]["normalizers"] == pytest.approx(list(expected), rel=1e-6)
    else:
        assert "normalizers" not in side["state"]
        assert side["provenance"]["normalizers"] == pytest.approx(list(expected), rel=1e-6)


def test_eval_and_search_with_corpus(xenv, other_tiny_model):
    tmp_path, folder = xenv
    runner = CliRunner()
    data = tmp_path / "labelled"
    for c in ("pug", "beagle"):
        (data / c).mkdir(parents=True)
        for g in GOOD[:3]:
            (data / c / g.replace("/", "_")).write_bytes((folder / g).read_bytes())
    res = runner.invoke(cli, ["eval", str(data), "--index", str(tmp_path / "idx"), "--corpus",
                              str(tmp_path / "corpus"), "--out", str(tmp_path / "rep"), "--tsne-samples", "0",
                              "--workers", "0", "-q"])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert [m["name"] for m in rep["methods"]] == ["clip", "coder", "xmore", "coder+xmore"]
    res = runner.invoke(cli, ["corpus", "search", str(tmp_path / "corpus"), str(folder / GOOD[0]), "-k", "3",
                              "--json"])
    assert res.exit_code == 0, res.output
    hits = json.loads(res.stdout)
    assert len(hits) == 3 and hits[0]["caption"].startswith("shard ")
    assert runner.invoke(cli, ["corpus", "info", str(tmp_path / "corpus")]).exit_code == 0
    runner.invoke(cli, ["build", str(tmp_path / "idx2"), "--classes", str(tmp_path / "classes.txt"), "--model",
                        other_tiny_model])
    res = runner.invoke(cli, ["classify", str(folder), "--index", str(tmp_path / "idx2"), "--out",
                              str(tmp_path / "q.csv"), "--corpus", str(tmp_path / "corpus"), "--method", "xmore"])
    assert res.exit_code == 1 and "build a corpus with this model" in res.output


def test_precomputed_text_embeddings(tmp_path, encoder):
    write_laion(tmp_path / "laion", [10, 12], encoder.embed_dim)
    (tmp_path / "laion" / "text_emb").mkdir()
    rng = np.random.default_rng(9)
    texts = []
    for s, n in enumerate([10, 12]):
        t = rng.standard_normal((n, encoder.embed_dim)).astype(np.float32)
        np.save(tmp_path / "laion" / "text_emb" / f"text_emb_{s}.npy", t)
        texts.append(t)
    m = ingest_laion(tmp_path / "c", encoder, tmp_path / "laion", use_text_embeddings=True)
    assert "precomputed" in m["caption_template"]
    t = np.concatenate(texts)
    np.testing.assert_allclose(Corpus(tmp_path / "c").caption_vectors, t / np.linalg.norm(t, axis=1, keepdims=True),
                               atol=1e-6)
    np.save(tmp_path / "laion" / "text_emb" / "text_emb_1.npy", texts[1][:5])
    with pytest.raises(InputFormatError, match="not row-aligned"):
        ingest_laion(tmp_path / "c2", encoder, tmp_path / "laion", use_text_embeddings=True)
