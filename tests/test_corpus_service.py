"""A kNN service as the corpus (``--corpus http://HOST:PORT/knn-service?indice=NAME``), against a real
clip-retrieval back-end started here on 127.0.0.1 over an index autofaiss built: the rows equal those of a
local corpus over the same embeddings and captions; a service that is down, an indice it lacks and the
default normaliser it cannot calibrate are each one clear line; the URL's secrets are written nowhere.

clip-retrieval lives in its own environment (it pins numpy<2): ``.knn-venv`` beside ``.venv``, which
``.ci/run`` makes (see CONTRIBUTING), or the Python named by ``CODER_INDEX_KNN_PYTHON``."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from knn_back import knn_python, make_indice, running_back
from test_corpus_reference import assert_same_rows, make_env, rows_of

from conftest import run_cli as run

KNN_PYTHON = knn_python()
pytestmark = pytest.mark.skipif(not Path(KNN_PYTHON).is_file(), reason=(
    f"clip-retrieval's environment is missing ({KNN_PYTHON}): .ci/run makes it (python3 -m venv .knn-venv, "
    "then pip install clip-retrieval there; see CONTRIBUTING)"))


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_model, encoder):
    root = make_env(tmp_path_factory.mktemp("knn"), tiny_model, encoder.embed_dim)
    # the indice folder as `clip-retrieval index` lays it out: image.index (autofaiss) + metadata/*.parquet
    (root / "normalised").mkdir()
    for p in sorted((root / "laion" / "img_emb").iterdir()):
        x = np.load(p).astype(np.float32)
        np.save(root / "normalised" / p.name, x / np.linalg.norm(x, axis=1, keepdims=True))
    make_indice(root / "normalised", root / "indice")
    shutil.copytree(root / "laion" / "metadata", root / "indice" / "metadata")
    (root / "indices.json").write_text(json.dumps({"tiny": str(root / "indice")}))
    with running_back(root / "indices.json", tiny_model.removeprefix("local-dir:")) as port:
        yield root, f"http://127.0.0.1:{port}/knn-service?indice=tiny"


def classify(root, corpus, out, *extra, **kw):
    return run("classify", root / "images", "--index", root / "idx", "--corpus", corpus, "--method", "xmore",
               "--out", out, "--workers", "0", "-q", *extra, **kw)


@pytest.mark.parametrize("retrieval", ["nearest", "released"])
def test_the_service_gives_the_rows_of_a_local_corpus_over_the_same_data(service, tmp_path, retrieval):
    root, url = service
    settings = ("--xmore-normalizer", "set", "--xmore-retrieval", retrieval)
    classify(root, root / "copied", tmp_path / "local.csv", *settings)
    classify(root, url, tmp_path / "service.csv", *settings)
    assert_same_rows(rows_of(tmp_path / "local.csv"), rows_of(tmp_path / "service.csv"))
    record = json.loads((tmp_path / "service.csv.run.json").read_text())
    assert record["provenance"]["corpus"]["path"] == url


def test_explain_shows_the_services_captions(service, tmp_path):
    root, url = service
    image = next(iter(sorted((root / "images").rglob("*.jpg"))))
    local = json.loads(run("explain", image, "--index", root / "idx", "--corpus", root / "copied", "--method",
                           "xmore", "--xmore-normalizer", "set", "--json").stdout)[0]
    remote = json.loads(run("explain", image, "--index", root / "idx", "--corpus", url, "--method", "xmore",
                            "--xmore-normalizer", "set", "--json").stdout)[0]
    assert local["prediction"] == remote["prediction"] and local["captions"]
    shown = [[(c["caption"], c["url"]) for c in e["captions"]] for e in (local, remote)]
    assert shown[0] == shown[1]
    np.testing.assert_allclose([c["cosine"] for c in local["captions"]], [c["cosine"] for c in remote["captions"]],
                               atol=1e-4)


def test_refusals_are_one_clear_line_and_secrets_stay_out(service, tmp_path, monkeypatch):
    root, url = service
    monkeypatch.setenv("CODER_INDEX_REMOTE_RETRIES", "2")
    monkeypatch.setenv("CODER_INDEX_REMOTE_BACKOFF", "0.01")
    res = classify(root, url, tmp_path / "a.csv", code=1)  # the corpus normaliser: a service has no images
    assert "--xmore-normalizer set" in res.output and len(res.output.strip().splitlines()) == 1
    res = classify(root, url.replace("indice=tiny", "indice=nope"), tmp_path / "b.csv", "--xmore-normalizer",
                   "set", code=1)
    assert "no indice 'nope'" in res.output and "tiny" in res.output
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    res = classify(root, f"http://127.0.0.1:{dead}/knn-service?indice=tiny", tmp_path / "c.csv",
                   "--xmore-normalizer", "set", code=1)
    assert f"127.0.0.1:{dead}" in res.output and "still after 2 tries" in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    secret = url.replace("http://", "http://knnuser:s3cretpass@")
    classify(root, secret, tmp_path / "d.csv", "--xmore-normalizer", "set")
    written = "".join(p.read_text(errors="replace") for p in tmp_path.iterdir() if p.is_file())
    assert "s3cretpass" not in written and "knnuser" not in written and rows_of(tmp_path / "d.csv")
