"""webdataset tar shards as classify's input, and --save-embeddings in clip-retrieval's layout: the
same rows as the same images in a folder, odd shards reported and never fatal, embeddings equal to
the model's, read back by corpus build, and a run killed anywhere resuming without loss or
duplicates. Shards are written here with the standard library's tarfile, as webdataset lays them out."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli as run
from conftest import shared_path
from scores import SCORE_ATOL, assert_same_ranking, csv_ranking


def photos(n: int) -> list[tuple[str, bytes]]:
    """(name, bytes) of n CIFAR-10 JPEGs, and two PNGs made here."""
    out = []
    for cls in ("cat", "ship", "truck"):
        for f in sorted((shared_path("data", "cifar10-test") / cls).iterdir())[: n // 3]:
            out.append((f"{cls}_{f.stem}", f.read_bytes()))
    for i, color in enumerate([(200, 30, 30), (30, 30, 200)]):
        buf = io.BytesIO()
        Image.new("RGB", (40, 28), color).save(buf, "PNG")
        out.append((f"png_{i}", buf.getvalue()))
    return out


def add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_shards(root: Path, samples: list[tuple[str, bytes]], per_shard: int) -> list[Path]:
    """webdataset layout: KEY.jpg|png, KEY.txt (caption), KEY.json, consecutive per key."""
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for s in range(0, len(samples), per_shard):
        path = root / f"{s // per_shard:05d}.tar"
        with tarfile.open(path, "w") as tf:
            for key, data in samples[s:s + per_shard]:
                ext = "png" if data.startswith(b"\x89PNG") else "jpg"
                add(tf, f"{key}.{ext}", data)
                add(tf, f"{key}.json", json.dumps({"key": key, "url": f"http://example.org/{key}"}).encode())
                add(tf, f"{key}.txt", f"a photo numbered {key}".encode())
        shards.append(path)
    return shards


def rows(path: Path) -> dict[str, dict]:
    with open(path, newline="") as f:
        return {r["path"]: r for r in csv.DictReader(f)}


def errors(out: Path, retry: str | None = None) -> dict[str, str]:
    """path -> reason of OUT's errors file (``retry``: only the rows marked so, "yes" or "no")."""
    p = out.with_name(out.name + ".errors.csv")
    if not p.exists():
        return {}
    with open(p, newline="") as f:
        return {r["path"]: r["error"] for r in csv.DictReader(f) if retry is None or r["retry"] == retry}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    samples = photos(18)
    folder = root / "folder"
    folder.mkdir()
    for key, data in samples:
        (folder / (key + (".png" if data.startswith(b"\x89PNG") else ".jpg"))).write_bytes(data)
    shards = write_shards(root / "data", samples, per_shard=7)
    return {"root": root, "samples": samples, "folder": folder, "shards": shards}


def test_shard_rows_equal_the_folder_rows_for_every_way_of_naming_the_shards(cifar_index, dataset, tmp_path,
                                                                             monkeypatch):
    monkeypatch.chdir(dataset["root"])
    run("classify", "folder", "--index", cifar_index, "--out", tmp_path / "folder.csv", "--workers", "0", "-q")
    by_key = {Path(p).stem: r for p, r in rows(tmp_path / "folder.csv").items()}
    outs = {}
    for name, args in {"files": [f"data/{s.name}" for s in dataset["shards"]], "folder": ["data"],
                       "braces": ["data/{00000..00002}.tar"]}.items():
        out = tmp_path / f"shards-{name}.csv"
        run("classify", *args, "--index", cifar_index, "--out", out, "--workers", "0", "--batch-size", "4", "-q")
        outs[name] = rows(out)
    assert outs["files"].keys() == outs["folder"].keys() == outs["braces"].keys()
    got = outs["files"]
    assert len(got) == len(dataset["samples"]) and errors(tmp_path / "shards-files.csv") == {}
    for path, r in got.items():
        shard, key = path.rsplit("/", 1)
        assert shard.startswith("data/000") and shard.endswith(".tar")  # rows are SHARD.tar/KEY
        assert_same_ranking(*csv_ranking(r), *csv_ranking(by_key[key]), what=path)
    # a rerun is done at once; a shard given twice is read once
    res = run("classify", "data/00000.tar", "data/00000.tar", "data", "--index", cifar_index, "--out",
              tmp_path / "shards-files.csv", "--workers", "0", "-q")
    assert "classified 0 images" in res.output


def test_odd_shards_are_reported_and_the_rest_classified(cifar_index, dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = dataset["samples"][:4]
    jpeg = good[0][1]
    odd = Path("odd")
    odd.mkdir()
    with tarfile.open(odd / "00000.tar", "w") as tf:
        add(tf, "ok_0.jpg", good[0][1])
        add(tf, "corrupt.jpg", jpeg[:300] + bytes(len(jpeg) - 302) + b"\xff\xd9")   # scrambled data
        add(tf, "captiononly.txt", b"no image here")
        add(tf, "captiononly.json", b"{}")
        link = tarfile.TarInfo("linked.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "ok_0.jpg"
        tf.addfile(link)
        add(tf, "notimage.jpg", b"this is text, not a JPEG")
        add(tf, "ok_1.png", next(d for _, d in dataset["samples"] if d.startswith(b"\x89PNG")))
    # a shard cut inside the data of its second image: the first classifies, the second is an error row
    whole = io.BytesIO()
    with tarfile.open(fileobj=whole, mode="w") as tf:
        add(tf, "first.jpg", good[1][1])
        add(tf, "second.jpg", good[2][1])
    data = whole.getvalue()
    cut = 512 + ((len(good[1][1]) + 511) // 512) * 512 + 512 + len(good[2][1]) // 2
    (odd / "00001.tar").write_bytes(data[:cut])
    # a shard whose second header is garbage: the first sample classifies, then one row names the shard
    garbled = bytearray(data)
    second_header = 512 + ((len(good[1][1]) + 511) // 512) * 512
    garbled[second_header:second_header + 512] = b"\x07" * 512
    (odd / "00002.tar").write_bytes(bytes(garbled))
    import gzip

    (odd / "00003.tar").write_bytes(gzip.compress(data))  # a gzip named .tar: read as webdataset reads it
    (odd / "00004.tar").write_bytes(b"")                   # empty file
    out = tmp_path / "odd.csv"
    res = run("classify", "odd/{00000..00005}.tar", "--index", cifar_index, "--out", out, "--workers", "0", "-q",
              ok=False)
    assert res.exit_code == 3, res.output  # incomplete: what could not be read is named, the rest classified
    got, final, retried = rows(out), errors(out, retry="no"), errors(out, retry="yes")
    # (00002.tar's first sample was being read when the damaged header came: it may lack a member, so it is
    # not kept; the rerun reads the shard again)
    assert set(got) == {"odd/00000.tar/ok_0", "odd/00000.tar/ok_1", "odd/00001.tar/first", "odd/00003.tar/first",
                        "odd/00003.tar/second"}
    assert "corrupt" in final["odd/00000.tar/corrupt"]
    assert "no image in this sample" in final["odd/00000.tar/captiononly"] and "json, txt" in final[
        "odd/00000.tar/captiononly"]
    assert "not a regular file" in final["odd/00000.tar/linked"]
    assert "not an image" in final["odd/00000.tar/notimage"]
    assert set(final) == {f"odd/00000.tar/{k}" for k in ("corrupt", "captiononly", "linked", "notimage")}
    # what could not be read is one row per shard, to retry; a shard cut short keeps the samples before the cut
    assert set(retried) == {"odd/00001.tar", "odd/00002.tar", "odd/00004.tar", "odd/00005.tar"}
    assert "truncated" in retried["odd/00001.tar"] or "cut short" in retried["odd/00001.tar"]
    assert "damaged header" in retried["odd/00002.tar"]
    assert "empty shard" in retried["odd/00004.tar"] and "no such shard" in retried["odd/00005.tar"]
    for shard in retried:
        assert shard in res.output or "more" in res.output
    assert "hold no image" not in res.output
    # a rerun reads again only what could not be read: nothing is doubled, the same four fail again
    res = run("classify", "odd/{00000..00005}.tar", "--index", cifar_index, "--out", out, "--workers", "0", "-q",
              ok=False)
    assert res.exit_code == 3 and "classified 0 images" in res.output and "0 unreadable" in res.output
    assert rows(out) == got and errors(out, retry="no") == final and set(errors(out, retry="yes")) == set(retried)
    with open(out.with_name(out.name + ".errors.csv"), newline="") as f:
        paths = [r["path"] for r in csv.DictReader(f)]
    assert len(paths) == len(set(paths))  # one row each, after the rerun too


def test_cli_refuses_mixed_or_missing_inputs(cifar_index, dataset, tmp_path):
    res = run("classify", dataset["shards"][0], dataset["folder"], "--index", cifar_index, "--out",
              tmp_path / "x.csv", ok=False)
    assert res.exit_code == 2 and "is not like the other inputs" in res.output
    res = run("classify", tmp_path / "nope", "--index", cifar_index, "--out", tmp_path / "x.csv", ok=False)
    assert res.exit_code == 2 and "no such file or folder" in res.output
    res = run("classify", tmp_path / "none-{0..3}.tar", "--index", cifar_index, "--out", tmp_path / "x.csv", ok=False)
    assert res.exit_code == 2 and "no such shard" in res.output


def read_saved(directory: Path) -> tuple[np.ndarray, list[dict]]:
    import pyarrow.parquet as pq

    embs, meta = [], []
    parts = sorted((directory / "img_emb").glob("img_emb_*.npy"), key=lambda p: int(p.stem.split("_")[-1]))
    for p in parts:
        n = p.stem.split("_")[-1]
        e = np.load(p, allow_pickle=False)
        m = pq.read_table(directory / "metadata" / f"metadata_{n}.parquet").to_pylist()
        assert len(e) == len(m)
        embs.append(e)
        meta += m
    return (np.concatenate(embs) if embs else np.zeros((0, 0))), meta


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_save_embeddings_layout_values_and_corpus_round_trip(cifar_index, dataset, tmp_path, dtype, encoder):
    emb_dir, out = tmp_path / "emb", tmp_path / "p.csv"
    run("classify", *dataset["shards"], "--index", cifar_index, "--out", out, "--workers", "0", "--batch-size", "4",
        "--save-embeddings", emb_dir, "--embeddings-dtype", dtype, "--embeddings-part-rows", "5", "-q")
    record = json.loads((emb_dir / "embeddings.json").read_text())
    assert record["dtype"] == dtype and record["dim"] == encoder.embed_dim and record["out"] == str(out.resolve())
    emb, meta = read_saved(emb_dir)
    # a part closes at the first batch that brings it to --embeddings-part-rows
    assert emb.dtype == np.dtype(dtype) and len(list((emb_dir / "img_emb").iterdir())) >= 2
    assert sorted(m["image_path"] for m in meta) == sorted(rows(out))
    by_key = dict(dataset["samples"])
    for m in meta:
        assert m["caption"] == f"a photo numbered {m['key']}" and json.loads(m["json"])["key"] == m["key"]
        assert m["shard"].endswith(".tar") and m["image_path"] == f"{m['shard']}/{m['key']}"
    images = [Image.open(io.BytesIO(by_key[m["key"]])).convert("RGB") for m in meta]
    want = encoder.encode_images(images)
    # float16 rounding, or float32 products of other batch shapes (tests/scores.py: SCORE_ATOL)
    np.testing.assert_allclose(emb.astype(np.float32), want, atol=2e-3 if dtype == "float16" else SCORE_ATOL)
    # read back as an X-MoRe corpus: one row per saved image, with its caption
    res = run("corpus", "build", tmp_path / "corpus", "--embeddings", emb_dir, "--index", cifar_index, "-q")
    assert f": {len(meta)} rows" in res.output and len(meta) == len(dataset["samples"])
    from coder_index.stores.corpus import Corpus

    corpus = Corpus(tmp_path / "corpus")
    assert corpus.index.ntotal == len(meta)


def test_clip_retrievals_reader_reads_the_saved_embeddings(cifar_index, dataset, tmp_path):
    """embedding-reader (what clip-retrieval's back end and autofaiss read with), parquet_npy format."""
    reader_module = pytest.importorskip("embedding_reader", reason="embedding-reader is not installed (test extra)")
    emb_dir, out = tmp_path / "emb", tmp_path / "p.csv"
    run("classify", *dataset["shards"], "--index", cifar_index, "--out", out, "--workers", "0", "-q",
        "--save-embeddings", emb_dir, "--embeddings-part-rows", "6")
    ours, meta = read_saved(emb_dir)
    reader = reader_module.EmbeddingReader(str(emb_dir / "img_emb"), file_format="parquet_npy",
                                           metadata_folder=str(emb_dir / "metadata"),
                                           meta_columns=["image_path", "caption"])
    assert reader.count == len(meta) == len(dataset["samples"]) and reader.dimension == ours.shape[1]
    got = {}
    for vecs, frame in reader(batch_size=7, show_progress=False):
        for vec, path, caption in zip(vecs, frame["image_path"], frame["caption"], strict=True):
            got[path] = (vec, caption)
    assert got.keys() == {m["image_path"] for m in meta}
    for vec, m in zip(ours, meta, strict=True):
        np.testing.assert_array_equal(got[m["image_path"]][0], vec)
        assert got[m["image_path"]][1] == m["caption"]


def test_save_embeddings_refuses_other_settings_and_says_what_earlier_rows_lack(cifar_index, dataset, tmp_path):
    emb_dir, out = tmp_path / "emb", tmp_path / "p.csv"
    run("classify", dataset["shards"][0], "--index", cifar_index, "--out", out, "--workers", "0", "-q")
    res = run("classify", *dataset["shards"], "--index", cifar_index, "--out", out, "--workers", "0", "-q",
              "--save-embeddings", emb_dir)
    n = len(dataset["samples"])
    assert f"holds the embeddings of {n - 7} row(s) (7 row(s) of earlier runs without --save-embeddings" in res.output
    staged = emb_dir / ".staging" / "meta_9.jsonl"   # as a killed run of this OUT would leave it
    staged.write_text('{"image_path": "x"}\n')
    res = run("classify", *dataset["shards"], "--index", cifar_index, "--out", out, "--workers", "0", "-q",
              "--save-embeddings", emb_dir, "--embeddings-dtype", "float32", ok=False)
    assert res.exit_code == 1 and "dtype differ" in res.output and "--overwrite" in res.output
    assert "dtype 'float16' there, 'float32' asked" in res.output  # the refusal names both values
    assert staged.read_text() == '{"image_path": "x"}\n'   # a refused run touches nothing
    res = run("classify", *dataset["shards"], "--index", cifar_index, "--out", tmp_path / "other.csv", "--workers",
              "0", "-q", "--save-embeddings", emb_dir, ok=False)
    assert res.exit_code == 1 and "out differ" in res.output
    res = run("classify", *dataset["shards"], "--index", cifar_index, "--out", tmp_path / "other.csv", "--workers",
              "0", "-q", "--save-embeddings", emb_dir, "--overwrite", ok=False)
    assert res.exit_code == 1 and "out differ" in res.output   # --overwrite never deletes another OUT's embeddings
    assert len(read_saved(emb_dir)[1]) == n - 7
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.md").write_text("mine")
    res = run("classify", *dataset["shards"], "--index", cifar_index, "--out", tmp_path / "third.csv", "--workers",
              "0", "-q", "--save-embeddings", tmp_path / "busy", ok=False)
    assert res.exit_code == 1 and "not empty" in res.output
    # --overwrite starts the run and its embeddings afresh: every row has one
    res = run("classify", *dataset["shards"], "--index", cifar_index, "--out", out, "--workers", "0", "-q",
              "--save-embeddings", emb_dir, "--overwrite")
    emb, meta = read_saved(emb_dir)
    assert len(meta) == len(rows(out)) == n and "without --save-embeddings" not in res.output


def _classify_cmd(dataset, cifar_index, out, emb_dir):
    return [sys.executable, "-m", "coder_index_cli.main", "classify", *map(str, dataset["shards"]), "--index",
            str(cifar_index), "--out", str(out), "--workers", "0", "--batch-size", "2", "--save-embeddings",
            str(emb_dir), "--embeddings-part-rows", "3", "-q"]


def _check_once_each(dataset, out, emb_dir):
    with open(out, newline="") as f:
        paths = [r["path"] for r in csv.DictReader(f)]
    assert len(paths) == len(set(paths)) == len(dataset["samples"])
    _, meta = read_saved(emb_dir)
    assert sorted(m["image_path"] for m in meta) == sorted(paths)   # every row's embedding, once
    assert not list((emb_dir / ".staging").iterdir())


def test_killed_mid_shard_twice_resumes_at_the_image_with_every_embedding_once(cifar_index, dataset, tmp_path):
    """Killed with a batch staged but its rows unwritten, then (resumed) killed with a part written
    from the staging but the staging not cleared; the third run completes."""
    emb_dir, out = tmp_path / "emb", tmp_path / "p.csv"
    cmd = _classify_cmd(dataset, cifar_index, out, emb_dir)
    for point in ("embeddings.staged#3", "embeddings.part_written#2", None):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **({"CODER_INDEX_CRASH_AT": point} if point else {})}
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if point:
            assert res.returncode == -9, res.stderr[-2000:]
            assert len(rows(out) if out.exists() else {}) < len(dataset["samples"])
        else:
            assert res.returncode == 0, res.stderr[-2000:]
    _check_once_each(dataset, out, emb_dir)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["embeddings.staged#3", "embeddings.part_written#1",
                                   "embeddings.metadata_written#1", "output.mid_record#2"])
def test_killed_once_at_each_point(cifar_index, dataset, tmp_path, point):
    emb_dir, out = tmp_path / "emb", tmp_path / "p.csv"
    cmd = _classify_cmd(dataset, cifar_index, out, emb_dir)
    env = {**os.environ, "CODER_INDEX_CRASH_AT": point, "HF_HUB_OFFLINE": "1"}
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    env.pop("CODER_INDEX_CRASH_AT")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    _check_once_each(dataset, out, emb_dir)
