"""A corpus by reference (``corpus build --embeddings DIR --reference``): it gives the rows a copied corpus
gives over the same embeddings and captions, local or on S3, with its own index or the user's; it never
writes to what it refers to; and every change to what it refers to is refused on open, in one line."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import run_cli as run
from images import make_messy_folder
from s3_server import s3_fs, s3_server, use_in_process

SCORE_ATOL = 1e-4  # float32 scores of two encodings of the same captions (other batches)


def write_folder(root, shards, dim, *, dtype=np.float16, row_group=7, seed=0):
    """A LAION-layout folder: fp16 embeddings (as LAION ships them), metadata in small row groups so
    that a lookup has several to choose from, text_emb of the raw captions."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((6, dim))
    for sub in ("img_emb", "metadata", "text_emb"):
        (root / sub).mkdir(parents=True)
    words = ["cat", "dog", "ship", "truck", "bird", "plane"]
    for s, n in enumerate(shards):
        c = rng.integers(0, len(centres), n)
        emb = (centres[c] + 0.5 * rng.standard_normal((n, dim))).astype(dtype)
        caps = [f"a {words[k]} seen in shard {s} row {i}" for i, k in enumerate(c)]
        np.save(root / "img_emb" / f"img_emb_{s}.npy", emb)
        np.save(root / "text_emb" / f"text_emb_{s}.npy", rng.standard_normal((n, dim)).astype(dtype))
        pq.write_table(pa.table({"caption": caps, "url": [f"http://x/{s}/{i}.jpg" for i in range(n)],
                                 "key": [f"{s:05d}{i:04d}" for i in range(n)]}),
                       root / "metadata" / f"metadata_{s}.parquet", row_group_size=row_group)


def snapshot(root):
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns,
                                       hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


def rows_of(path):
    with open(path, newline="", encoding="utf-8") as f:
        return {r["path"]: r for r in csv.DictReader(f)}


def make_env(root, tiny_model, dim):
    """An index, a LAION-layout folder (``laion``), a corpus copied from it (``copied``) and a messy
    image folder (``images``) under ``root``."""
    (root / "classes.txt").write_text("cat\ndog\nship\ntruck\nbird\nplane\n")
    run("build", root / "idx", "--classes", root / "classes.txt", "--model", tiny_model, "--llm", "none", "-q")
    write_folder(root / "laion", [50, 30, 41], dim)
    make_messy_folder(root / "images")
    run("corpus", "build", root / "copied", "--embeddings", root / "laion", "--index", root / "idx", "-q")
    return root


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model, encoder):
    return make_env(tmp_path_factory.mktemp("reference"), tiny_model, encoder.embed_dim)


def classify(env, corpus, out, *extra):
    run("classify", env / "images", "--index", env / "idx", "--corpus", corpus, "--method", "xmore", "--out", out,
        "--workers", "0", "-q", *extra)
    return rows_of(out)


def assert_same_rows(a, b):
    assert a.keys() == b.keys() and a
    for path in a:
        assert a[path]["label"] == b[path]["label"], path
        assert abs(float(a[path]["score"]) - float(b[path]["score"])) <= SCORE_ATOL, path


def test_a_corpus_by_reference_gives_the_rows_of_a_copied_one_and_writes_nothing_it_refers_to(env, tmp_path):
    before = snapshot(env / "laion")
    run("corpus", "build", tmp_path / "ref", "--embeddings", env / "laion", "--reference", "--index", env / "idx",
        "-q")
    assert sorted(p.name for p in (tmp_path / "ref").iterdir()) == ["corpus.faiss", "manifest.json"]  # no copy
    manifest = json.loads((tmp_path / "ref" / "manifest.json").read_text())
    assert manifest["kind"] == "reference" and manifest["rows"] == 121
    assert len(manifest["embeddings"]["shards"]) == 3
    for normalizer in ("corpus", "set"):
        copied = classify(env, env / "copied", tmp_path / f"c-{normalizer}.csv", "--xmore-normalizer", normalizer)
        referred = classify(env, tmp_path / "ref", tmp_path / f"r-{normalizer}.csv", "--xmore-normalizer", normalizer)
        assert_same_rows(copied, referred)
    # the same neighbours, captions and trace for `corpus search`
    image = next(iter(sorted((env / "images").rglob("*.jpg"))))
    a = json.loads(run("corpus", "search", env / "copied", image, "-k", "8", "--json").stdout)
    b = json.loads(run("corpus", "search", tmp_path / "ref", image, "-k", "8", "--json").stdout)
    assert [h["caption"] for h in a] == [h["caption"] for h in b]
    assert [h["url"] for h in a] == [h["url"] for h in b]
    np.testing.assert_allclose([h["cosine"] for h in a], [h["cosine"] for h in b], atol=1e-5)
    assert snapshot(env / "laion") == before  # nothing referred to was written, not even touched
    info = run("corpus", "info", tmp_path / "ref").stdout
    assert "refers to" in info and "nothing copied" in info


def test_the_users_faiss_index_is_searched_as_it_is(env, tmp_path):
    """--index-file: an IVF index the user built (autofaiss's kind: inner product over normalised rows, ids
    the rows). Only the manifest is written; the neighbours are that index's."""
    emb = np.concatenate([np.load(p).astype(np.float32) for p in sorted((env / "laion" / "img_emb").iterdir())])
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    index = faiss.index_factory(emb.shape[1], "IVF4,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(emb)
    index.add(emb)
    index.nprobe = 4
    knn = tmp_path / "knn.index"
    faiss.write_index(index, str(knn))
    before = snapshot(env / "laion"), knn.read_bytes()
    run("corpus", "build", tmp_path / "ref", "--embeddings", env / "laion", "--reference", "--index-file", knn,
        "--index", env / "idx", "-q")
    assert sorted(p.name for p in (tmp_path / "ref").iterdir()) == ["manifest.json"]
    from coder_index.stores.corpus import Corpus

    corpus = Corpus(tmp_path / "ref")
    corpus.set_nprobe(4)
    q = np.random.default_rng(3).standard_normal((5, emb.shape[1])).astype(np.float32)
    got = corpus.search(q, 6)[1]
    want = index.search(q / np.linalg.norm(q, axis=1, keepdims=True), 6)[1]
    np.testing.assert_array_equal(got, want)
    all_captions = [c for p in sorted((env / "laion" / "metadata").iterdir())
                    for c in pq.read_table(p).column("caption").to_pylist()]
    assert corpus.captions(got[0]) == [all_captions[i] for i in got[0]]
    classify(env, tmp_path / "ref", tmp_path / "u.csv")
    assert (snapshot(env / "laion"), knn.read_bytes()) == before


def _damage(kind, laion, knn):
    meta = laion / "metadata" / "metadata_1.parquet"
    emb = laion / "img_emb" / "img_emb_2.npy"
    if kind == "metadata gone":
        meta.unlink()
    elif kind == "embeddings cut short":
        with open(emb, "r+b") as f:
            f.truncate(emb.stat().st_size - 64)
    elif kind == "embeddings rewritten, same size (head)":
        data = bytearray(emb.read_bytes())
        data[200] ^= 0xFF
        emb.write_bytes(bytes(data))
    elif kind == "metadata rewritten, same size (tail)":
        data = bytearray((laion / "metadata" / "metadata_0.parquet").read_bytes())
        data[-40] ^= 0xFF
        (laion / "metadata" / "metadata_0.parquet").write_bytes(bytes(data))
    elif kind == "shard added":
        shutil.copy(emb, laion / "img_emb" / "img_emb_3.npy")
        shutil.copy(meta, laion / "metadata" / "metadata_3.parquet")
    elif kind == "index replaced":
        index = faiss.read_index(str(knn))
        index.add(np.zeros((1, index.d), np.float32))
        faiss.write_index(index, str(knn))
    elif kind == "index gone":
        knn.unlink()


@pytest.mark.parametrize("kind", ["metadata gone", "embeddings cut short", "embeddings rewritten, same size (head)",
                                  "metadata rewritten, same size (tail)", "shard added", "index replaced",
                                  "index gone"])
def test_every_change_to_what_is_referred_to_is_refused_in_one_line(env, tmp_path, kind):
    laion = tmp_path / "laion"
    shutil.copytree(env / "laion", laion)
    emb = np.concatenate([np.load(p).astype(np.float32) for p in sorted((laion / "img_emb").iterdir())])
    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(emb / np.linalg.norm(emb, axis=1, keepdims=True))
    knn = tmp_path / "knn.index"
    faiss.write_index(index, str(knn))
    run("corpus", "build", tmp_path / "ref", "--embeddings", laion, "--reference", "--index-file", knn,
        "--index", env / "idx", "-q")
    run("corpus", "info", tmp_path / "ref")
    _damage(kind, laion, knn)
    for args in (("corpus", "info", tmp_path / "ref"),
                 ("classify", env / "images", "--index", env / "idx", "--corpus", tmp_path / "ref", "--method",
                  "xmore", "--out", tmp_path / "x.csv", "--workers", "0", "-q")):
        res = run(*args, code=1)
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and "Traceback" not in res.output, res.output
        assert "build the corpus again" in lines[0] or "put back" in lines[0], lines[0]
        assert any(w in lines[0] for w in ("changed", "gone", "missing", "rewritten")), lines[0]
    assert not (tmp_path / "x.csv").exists()


def test_refusals_say_what_to_do(env, tmp_path):
    emb = np.concatenate([np.load(p).astype(np.float32) for p in sorted((env / "laion" / "img_emb").iterdir())])
    l2 = faiss.IndexFlatL2(emb.shape[1])
    l2.add(emb)
    faiss.write_index(l2, str(tmp_path / "l2.index"))
    short = faiss.IndexFlatIP(emb.shape[1])
    short.add(emb[:-1])
    faiss.write_index(short, str(tmp_path / "short.index"))
    (tmp_path / "junk.index").write_bytes(b"not an index at all")
    base = ("corpus", "build", tmp_path / "c", "--embeddings", env / "laion", "--index", env / "idx", "-q")
    cases = [
        ((*base, "--reference", "--index-file", tmp_path / "l2.index"), 1, "L2"),
        ((*base, "--reference", "--index-file", tmp_path / "short.index"), 1, "ids must be the folder's rows"),
        ((*base, "--reference", "--index-file", tmp_path / "junk.index"), 1, "not a FAISS index"),
        ((*base, "--index-file", tmp_path / "short.index"), 2, "add --reference"),
        ((*base, "--reference", "--index-file", tmp_path / "short.index", "--index-factory", "IVF4,Flat"), 2,
         "give one of them"),
        (("corpus", "build", tmp_path / "c", "--embeddings", "s3://bucket/laion", "--index", env / "idx"), 2,
         "--reference"),
        (("corpus", "build", tmp_path / "c", "--embeddings", tmp_path / "nowhere", "--reference", "--index",
          env / "idx"), 2, "no such folder"),
    ]
    for args, code, words in cases:
        res = run(*args, code=code)
        assert words in res.output, (args, res.output)
        assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


def test_a_corpus_on_s3_by_reference_gives_the_local_rows(env, tmp_path, monkeypatch):
    """The embedding folder in an object store: listed, its .npy headers and the retrieved rows' caption
    row groups read by byte ranges; the rows equal those of the same folder on disk."""
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    empty = tmp_path / "aws-empty"
    empty.write_text("")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    run("corpus", "build", tmp_path / "local-ref", "--embeddings", env / "laion", "--reference", "--index",
        env / "idx", "-q")
    local = classify(env, tmp_path / "local-ref", tmp_path / "l.csv")
    with s3_server() as s3env:
        use_in_process(s3env, monkeypatch)
        fs = s3_fs(s3env)
        fs.mkdir("refs")
        fs.put(str(env / "laion") + "/", "refs/laion/", recursive=True)
        run("corpus", "build", tmp_path / "s3-ref", "--embeddings", "s3://refs/laion", "--reference", "--index",
            env / "idx", "-q")
        remote = classify(env, tmp_path / "s3-ref", tmp_path / "s.csv")
        assert_same_rows(local, remote)
        fs.rm("refs/laion/metadata/metadata_2.parquet")
        res = run("corpus", "info", tmp_path / "s3-ref", code=1)
        assert "metadata_2.parquet" in res.output and "gone" in res.output


def test_missing_neighbours_are_no_captions():
    from coder_index.methods.xmore.predict import caption_mean

    p = np.random.default_rng(0).dirichlet(np.ones(4), size=(3, 5))
    found = np.ones((3, 5), bool)
    found[1, 3:] = False
    found[2] = False
    out = caption_mean(p, found)
    np.testing.assert_allclose(out[0], p[0].mean(0))
    np.testing.assert_allclose(out[1], p[1, :3].mean(0))
    np.testing.assert_allclose(out[2], np.full(4, 0.25))


def _resident_kb_of(path):
    """Resident kB of this process's mappings of ``path`` (from /proc/self/smaps), and whether any exists."""
    target, total, mapped, inside = str(path.resolve()), 0, False, False
    with open("/proc/self/smaps", encoding="utf-8", errors="surrogateescape") as smaps:
        for line in smaps:
            head = line.split(None, 5)
            if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                inside = len(head) == 6 and head[5].rstrip("\n") == target
                mapped = mapped or inside
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total, mapped


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads /proc/self/smaps (Linux only)")
@pytest.mark.parametrize("factory", ["Flat", "IVF8,PQ8", "IVF8,Flat", "HNSW8"])
def test_the_index_is_mapped_not_read_and_a_search_leaves_none_of_it_resident(encoder, tmp_path, factory):
    """Every kind of index a corpus by reference may hold is memory-mapped (FAISS's IO flags), and after a
    search its pages are no longer this process's resident memory (they stay in the page cache): a
    process searching batch after batch holds one batch's pages, never the index. A large Flat index
    shows both: read whole, or resident after searching, it would be tens of MB."""
    rng = np.random.default_rng(4)
    dim, rows = encoder.embed_dim, 240_000 * 16 // encoder.embed_dim
    folder = tmp_path / "big"
    for sub in ("img_emb", "metadata"):
        (folder / sub).mkdir(parents=True)
    emb = rng.standard_normal((rows, dim)).astype(np.float32)
    np.save(folder / "img_emb" / "img_emb_0.npy", emb)
    pq.write_table(pa.table({"caption": [f"c{i}" for i in range(rows)]}), folder / "metadata" / "metadata_0.parquet")
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    index.train(emb[:5000])
    index.add(emb)
    knn = tmp_path / "knn.index"
    faiss.write_index(index, str(knn))
    del index
    from coder_index.stores.corpus_reference import ReferenceCorpus, build_reference_corpus

    build_reference_corpus(tmp_path / "ref", encoder.fingerprint, dim, str(folder),
                           index_file=knn)
    corpus = ReferenceCorpus(tmp_path / "ref")
    resident, mapped = _resident_kb_of(knn)
    assert mapped, f"{factory}: the index file is not memory-mapped"
    q = emb[rng.choice(rows, 300, replace=False)]
    _, ids = corpus.search(q, 5)
    assert (ids[:, 0] >= 0).all()
    after, mapped = _resident_kb_of(knn)
    assert mapped and after <= 64, f"{factory}: {after} kB of the index still resident after a search"
    if factory == "Flat":  # 15 MB of vectors, every one read by a search; the answer is the exact one
        assert knn.stat().st_size > 10_000_000
        exact = faiss.IndexFlatIP(dim)
        exact.add(emb)
        np.testing.assert_array_equal(ids, exact.search(q, 5)[1])
