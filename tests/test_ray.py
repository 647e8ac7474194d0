"""The Ray engine (``--engine ray``) on a local Ray instance the tests start: the same rows as the local
engine, nothing lost when a worker is killed, resume, builds and corpus ingests spread over actors,
and the index copied to workers from a URI. Needs the ``ray`` extra (installed by .ci/run)."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from coder_index_cli.main import cli

from conftest import run_cli, shared_path
from images import BAD, GOOD, make_messy_folder
from scores import assert_same_ranking, csv_ranking

ray = pytest.importorskip("ray", reason="the ray extra is not installed: pip install -e '.[ray]'")
# one Ray at a time: under pytest-xdist the Ray modules share one worker (--dist loadgroup)
pytestmark = pytest.mark.xdist_group("ray")


run = run_cli  # conftest's: the command line in this process, as a user types it


@pytest.fixture(scope="module", autouse=True)
def local_ray(tmp_path_factory):
    """One local Ray instance for the module; the engines use it as they find it (and leave it up)."""
    os.environ["CODER_INDEX_WORKER_CACHE"] = str(tmp_path_factory.mktemp("worker-cache"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("ray-index")
    classes = root / "classes.txt"
    classes.write_text("Abyssinian\nBengal\nbeagle\npug\nsamoyed\n")
    run("build", root / "idx", "--classes", classes, "--model", tiny_model, "--dataset", "oxford_pets",
        "--descriptors", shared_path("data", "descriptors", "descriptors_pets.json"), "-q")
    return root / "idx"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The messy folder (corrupt, truncated and fake images included) plus 90 CIFAR-10 photos."""
    root = make_messy_folder(tmp_path_factory.mktemp("ray-images"))
    cifar = shared_path("data", "cifar10-test")
    for cls in ("cat", "ship", "truck"):
        (root / cls).mkdir()
        for f in sorted((cifar / cls).iterdir())[:30]:
            os.symlink(f, root / cls / f.name)
    return root


N_GOOD = len(GOOD) + 90


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_same_rows(a, b):
    """The same paths, methods and rankings (scores within SCORE_ATOL: see tests/scores.py)."""
    ra, rb = sorted(rows(a), key=lambda r: r["path"]), sorted(rows(b), key=lambda r: r["path"])
    assert [r["path"] for r in ra] == [r["path"] for r in rb]
    for x, y in zip(ra, rb, strict=True):
        assert x.keys() == y.keys() and x["method"] == y["method"]
        assert_same_ranking(*csv_ranking(x), *csv_ranking(y), what=x["path"])


def error_paths(out):
    errs = sorted(out.parent.glob(out.name + ".errors*"))
    assert errs, "no errors file"
    with open(errs[0], newline="") as f:
        return sorted(r["path"] for r in csv.DictReader(f))


@pytest.mark.parametrize("extra", [[], pytest.param(["--rerank", "--llm", "none"], marks=pytest.mark.slow),
                                   pytest.param(["--decode", "gpu"], marks=pytest.mark.slow)],
                         ids=["coder", "coder*", "tensor-decoder"])
def test_ray_rows_equal_the_local_engine(index_dir, folder, tmp_path, extra):
    local, remote = tmp_path / "local.csv", tmp_path / "ray.csv"
    run("classify", folder, "--index", index_dir, "--out", local, "--top-k", "3", *extra, "-q")
    res = run("classify", folder, "--index", index_dir, "--out", remote, "--top-k", "3", *extra, "--engine", "ray",
              "--batch-size", "16", "-q")
    assert len(rows(remote)) == N_GOOD
    assert_same_rows(local, remote)
    assert error_paths(remote) == error_paths(local) and len(error_paths(remote)) == len(BAD)
    sidecar = json.loads((tmp_path / "ray.csv.run.json").read_text())
    assert "index" in sidecar or "provenance" in sidecar
    assert res.exit_code == 0


def test_shards_and_saved_embeddings_on_ray_equal_the_local_engine(index_dir, tmp_path, monkeypatch):
    """webdataset shards through Ray actors (each reads its samples at their offsets): the local
    engine's rows, errors and --save-embeddings (captions carried by the driver)."""
    import io
    import tarfile

    import pyarrow.parquet as pq

    cifar = shared_path("data", "cifar10-test")
    samples = [(f"{c}_{f.stem}", f.read_bytes()) for c in ("cat", "ship") for f in sorted((cifar / c).iterdir())[:9]]
    samples.insert(5, ("broken", b"\xff\xd8\xff not a jpeg"))
    monkeypatch.chdir(tmp_path)
    for s in range(0, len(samples), 8):
        with tarfile.open(f"{s // 8:05d}.tar", "w") as tf:
            for key, data in samples[s:s + 8]:
                for name, payload in ((f"{key}.jpg", data), (f"{key}.txt", f"caption {key}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
    shards = sorted(str(p.name) for p in tmp_path.glob("*.tar"))
    for engine in ("local", "ray"):
        res = run("classify", *shards, "--index", index_dir, "--out", tmp_path / f"{engine}.csv", "--save-embeddings",
                  tmp_path / f"{engine}-emb", "--batch-size", "4", "-q",
                  *(["--engine", "ray"] if engine == "ray" else []))
        assert "classified" in res.output
    assert len(rows(tmp_path / "ray.csv")) == len(samples) - 1
    assert_same_rows(tmp_path / "local.csv", tmp_path / "ray.csv")
    assert error_paths(tmp_path / "ray.csv") == error_paths(tmp_path / "local.csv") == ["00000.tar/broken"]
    saved = {}
    for engine in ("local", "ray"):
        meta = [r for p in sorted((tmp_path / f"{engine}-emb" / "metadata").glob("*.parquet"))
                for r in pq.read_table(p).to_pylist()]
        emb = np.concatenate([np.load(p) for p in sorted((tmp_path / f"{engine}-emb" / "img_emb").glob("*.npy"))])
        saved[engine] = {m["image_path"]: (m["caption"], e) for m, e in zip(meta, emb, strict=True)}
    assert saved["ray"].keys() == saved["local"].keys() == {r["path"] for r in rows(tmp_path / "ray.csv")}
    for path, (caption, vec) in saved["ray"].items():
        assert caption == saved["local"][path][0] == f"caption {path.rsplit('/', 1)[1]}"
        np.testing.assert_allclose(vec.astype(np.float32), saved["local"][path][1].astype(np.float32), atol=2e-3)


def test_parquet_list_and_shard_faults_on_ray_equal_the_local_engine(index_dir, tmp_path, monkeypatch):
    """Any source through Ray actors, faults included: a parquet file by row group (a failed download
    among its rows), a file list with a missing file, shards with a missing one. The same rows, the
    same errors (final, and to retry), the same exit status (3: incomplete) as the local engine."""
    import io
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    cifar = shared_path("data", "cifar10-test")
    files = [f for c in ("cat", "ship") for f in sorted((cifar / c).iterdir())[:7]]
    monkeypatch.chdir(tmp_path)
    keys = [f"{f.parent.name}_{f.stem}" for f in files]
    pq.write_table(pa.table({"key": [*keys, "failed"], "jpg": pa.array([f.read_bytes() for f in files] + [None],
                                                                        pa.binary()),
                             "status": ["success"] * len(files) + ["failed_to_download"]}), "x.parquet",
                   row_group_size=4)
    Path("list.txt").write_text("".join(f"{f}\n" for f in files) + "gone.jpg\n")
    with tarfile.open("00000.tar", "w") as tf:
        for key, f in zip(keys, files, strict=True):
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = f.stat().st_size
            tf.addfile(info, io.BytesIO(f.read_bytes()))
    cases = {"parquet": ["x.parquet"], "list": ["--files-from", "list.txt"], "shards": ["{00000..00001}.tar"]}
    for name, args in cases.items():
        outs = {}
        for engine in ("local", "ray"):
            outs[engine] = tmp_path / f"{name}-{engine}.csv"
            res = run("classify", *args, "--index", index_dir, "--out", outs[engine], "--batch-size", "4", "-q",
                      *(["--engine", "ray"] if engine == "ray" else []), ok=False)
            assert res.exit_code == (0 if name == "parquet" else 3), (name, engine, res.output)
        assert len(rows(outs["ray"])) == len(files)
        assert_same_rows(outs["local"], outs["ray"])
        with open(outs["local"].with_name(outs["local"].name + ".errors.csv"), newline="") as f:
            local_errors = sorted(tuple(r.values()) for r in csv.DictReader(f))
        with open(outs["ray"].with_name(outs["ray"].name + ".errors.csv"), newline="") as f:
            ray_errors = sorted(tuple(r.values()) for r in csv.DictReader(f))
        assert ray_errors == local_errors and len(ray_errors) == 1, name


def test_a_killed_worker_loses_nothing(index_dir, folder, tmp_path, monkeypatch):
    marker = tmp_path / "crashed"
    monkeypatch.setenv("CODER_INDEX_CRASH_ONCE", f"ray.worker.batch:{marker}")
    out = tmp_path / "ray.csv"
    run("classify", folder, "--index", index_dir, "--out", out, "--engine", "ray", "--batch-size", "8", "-q")
    assert marker.exists(), "no worker was killed: the test did not test anything"
    paths = [r["path"] for r in rows(out)]
    assert len(paths) == N_GOOD and len(set(paths)) == N_GOOD
    local = tmp_path / "local.csv"
    run("classify", folder, "--index", index_dir, "--out", local, "-q")
    assert_same_rows(local, out)


@pytest.mark.slow  # resume is the driver's, engine-independent (tested on the local engine by default)
def test_resume_and_settings(index_dir, folder, tmp_path):
    out = tmp_path / "ray.csv"
    run("classify", folder, "--index", index_dir, "--out", out, "--engine", "ray", "-q")
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:-40]) + lines[-40][:10])  # interrupted: 40 rows lost, one torn
    res = run("classify", folder, "--index", index_dir, "--out", out, "--engine", "ray")
    assert f"{N_GOOD - 40 + len(BAD)} done in earlier runs" in res.output, res.output
    paths = [r["path"] for r in rows(out)]
    assert len(paths) == N_GOOD and len(set(paths)) == N_GOOD
    # nothing left to do: Ray is not even needed
    res = run("classify", folder, "--index", index_dir, "--out", out, "--engine", "ray")
    assert f"{N_GOOD + len(BAD)} done in earlier runs" in res.output
    # another setting on the same output is refused, as with the local engine
    res = run("classify", folder, "--index", index_dir, "--out", out, "--engine", "ray", "--top-k", "2", ok=False)
    assert res.exit_code != 0 and "top" in res.output.lower()


@pytest.mark.slow  # 20 s: opt in with -m slow (the default run stays under 10 minutes on 2 cores)
def test_index_copied_to_workers_from_a_uri(index_dir, folder, tmp_path, tiny_model):
    out, local = tmp_path / "uri.csv", tmp_path / "local.csv"
    run("classify", folder, "--index", index_dir, "--out", out, "--engine", "ray",
        "--ray-index-source", index_dir.resolve().as_uri(), "-q")
    run("classify", folder, "--index", index_dir, "--out", local, "-q")
    assert_same_rows(local, out)
    copies = [p for p in Path(os.environ["CODER_INDEX_WORKER_CACHE"]).iterdir() if not p.name.startswith(".")]
    assert copies and all((c / "texts.faiss").is_file() for c in copies), "no finished copy in the cache"
    # a source holding another index is refused with the reason, never used
    other = tmp_path / "other"
    classes = tmp_path / "c.txt"
    classes.write_text("cat\ndog\n")
    run("build", other, "--classes", classes, "--model", tiny_model, "--llm", "none", "-q")
    res = CliRunner().invoke(cli, ["classify", str(folder), "--index", str(index_dir), "--out",
                                   str(tmp_path / "bad.csv"), "--engine", "ray", "--ray-index-source", str(other),
                                   "-q"])
    assert res.exit_code != 0
    assert "not the one the driver" in res.output, res.output
    assert not (tmp_path / "bad.csv").exists() or len(rows(tmp_path / "bad.csv")) == 0


@pytest.mark.slow  # the Ray text encoder; its long siblings (corpus ingest, index URI) are slow too
def test_build_on_ray_equals_local(tmp_path, tiny_model):
    from coder_index import TextIndex

    classes = tmp_path / "classes.txt"
    classes.write_text("Abyssinian\nBengal\nbeagle\npug\nsamoyed\n")
    desc = shared_path("data", "descriptors", "descriptors_pets.json")
    common = ["--classes", classes, "--model", tiny_model, "--dataset", "oxford_pets", "--descriptors", desc, "-q"]
    run("build", tmp_path / "local", *common)
    run("build", tmp_path / "ray", *common, "--engine", "ray")

    a, b = TextIndex.open(tmp_path / "local").text_table(), TextIndex.open(tmp_path / "ray").text_table()
    assert len(a) == len(b) > 5
    assert a.class_ids.tolist() == b.class_ids.tolist() and a.kinds.tolist() == b.kinds.tolist()
    np.testing.assert_allclose(np.asarray(a.embeddings), np.asarray(b.embeddings), atol=1e-5)


@pytest.mark.slow  # 30 s: opt in with -m slow (the default run stays under 10 minutes on 2 cores)
def test_corpus_embeddings_on_ray_equal_local(tmp_path, index_dir, encoder):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from coder_index.stores.corpus import Corpus

    rng = np.random.default_rng(0)
    (tmp_path / "laion" / "img_emb").mkdir(parents=True)
    (tmp_path / "laion" / "metadata").mkdir()
    for s, n in enumerate((40, 25, 35)):
        np.save(tmp_path / "laion" / "img_emb" / f"img_emb_{s}.npy",
                rng.standard_normal((n, encoder.embed_dim)).astype(np.float32))
        pq.write_table(pa.table({"caption": [f"shard {s} thing {i}" for i in range(n)]}),
                       tmp_path / "laion" / "metadata" / f"metadata_{s}.parquet")
    for name, extra in (("local", []), ("ray", ["--engine", "ray"])):
        run("corpus", "build", tmp_path / name, "--embeddings", tmp_path / "laion", "--index", index_dir, "-q", *extra)
    fp = encoder.fingerprint
    ids = np.arange(100)[None, :]
    a = Corpus(tmp_path / "local", fp).caption_embeddings(ids)
    b = Corpus(tmp_path / "ray", fp).caption_embeddings(ids)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_xmore_on_ray_equals_the_local_engine(methods_env, tmp_path):
    """With the corpus's normalisers an image's X-MoRe answer is its own: Ray's actors score it as the
    local engine does. Normalisers over a set or running sums need the run in one place: refused."""
    args = ["classify", methods_env / "images", "--index", methods_env / "idx", "--corpus", methods_env / "corpus",
            "--method", "xmore", "--top-k", "3", "-q"]
    run(*args, "--out", tmp_path / "local.csv")
    run(*args, "--out", tmp_path / "ray.csv", "--engine", "ray", "--batch-size", "4")
    assert len(rows(tmp_path / "ray.csv")) == 9
    assert_same_rows(tmp_path / "local.csv", tmp_path / "ray.csv")
    res = run(*args, "--out", tmp_path / "set.csv", "--engine", "ray", "--xmore-normalizer", "set", ok=False)
    assert res.exit_code == 2 and "--xmore-normalizer set" in res.output
