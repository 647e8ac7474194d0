"""Every row explainable, and the explanation agreeing with it: for each method (coder, coder*, the
adapter, xmore, coder+xmore) every row of a small run is explained with `explain --predictions OUT
--row N`, and gives the row's label, scores and runner-up within SCORE_ATOL; rows read from shards
(in place, compressed, by URL) and from listed files are read back from where classify read them."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pytest

from http_server import FileServer
from scores import SCORE_ATOL, csv_ranking
from test_shards import photos, write_shards

CLASSES = ["red", "green", "blue"]


from conftest import run_cli as run  # noqa: E402


def rows_of(out: Path) -> list[dict]:
    with open(out, newline="") as f:
        return list(csv.DictReader(f))


METHODS = {"coder": [], "coder*": ["--rerank", "--llm", "none"], "adapter": ["--adapter", "{root}/adapter"],
           "xmore": ["--corpus", "{root}/corpus", "--method", "xmore"],
           "coder+xmore": ["--corpus", "{root}/corpus", "--method", "coder+xmore"]}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_row_explained_agrees_with_it(methods_env, tmp_path, monkeypatch, method):
    monkeypatch.chdir(methods_env)
    out = tmp_path / f"{method}.csv"
    extra = [a.replace("{root}", str(methods_env)) for a in METHODS[method]]
    run("classify", "images", "--index", "idx", "--out", out, "--workers", "0", "--top-k", "3", "-q", *extra)
    rows = rows_of(out)
    assert len(rows) == 9
    args = ["explain", "--index", methods_env / "idx", "--predictions", out, "--json"]
    for n in range(1, len(rows) + 1):
        args += ["--row", str(n)]
    monkeypatch.chdir(tmp_path)  # explain from elsewhere: the rows are read from where classify ran
    res = run(*args)
    explained = json.loads(res.stdout)
    assert [e["path"] for e in explained] == [r["path"] for r in rows]
    for row, e in zip(rows, explained, strict=True):
        labels, scores = csv_ranking(row)
        assert e["prediction"] == row["label"] and e["method"] == row["method"], (row, e["prediction"])
        got = {c["class"]: c["score"] for c in e["classes"]}
        for label, score in zip(labels, scores, strict=True):
            assert abs(got[label] - score) <= SCORE_ATOL, (method, row["path"], label, got[label], score)
        assert e["runner_up"] == labels[1]


@pytest.mark.parametrize("normalizer", ["corpus", "set"])
def test_xmore_explained_alone_gives_the_rows_numbers(methods_env, tmp_path, monkeypatch, normalizer):
    """Explaining one row of an X-MoRe run gives that row's numbers. With the corpus normaliser (the
    default) the image explained on its own, without the run, gives them too; with the set normaliser
    the run's record holds the normalisers its rows were scored with, and explaining by row uses them."""
    monkeypatch.chdir(methods_env)
    out = tmp_path / "x.csv"
    run("classify", "images", "--index", "idx", "--out", out, "--workers", "0", "--corpus", "corpus", "--method",
        "xmore", "--xmore-normalizer", normalizer, "-q")
    state = json.loads(out.with_name("x.csv.run.json").read_text())["state"]
    assert ("normalizers" in state) == (normalizer == "set")
    row = rows_of(out)[4]
    alone = json.loads(run("explain", "--index", "idx", "--predictions", out, "--row", "5", "--json").stdout)[0]
    assert abs(alone["classes"][0]["score"] - float(row["score"])) <= SCORE_ATOL
    loose = json.loads(run("explain", row["path"], "--index", "idx", "--corpus", "corpus", "--method", "xmore",
                           "--xmore-normalizer", normalizer, "--json").stdout)[0]
    assert loose["path"] == row["path"]
    if normalizer == "corpus":  # no company: the same class and score as in the run
        assert loose["prediction"] == row["label"]
        assert abs(loose["classes"][0]["score"] - float(row["score"])) <= SCORE_ATOL


def test_method_options_beside_predictions_are_refused(methods_env, tmp_path, monkeypatch):
    monkeypatch.chdir(methods_env)
    out = tmp_path / "c.csv"
    run("classify", "images", "--index", "idx", "--out", out, "--workers", "0", "-q")
    res = run("explain", "--index", "idx", "--predictions", out, "--row", "1", "--rerank", ok=False)
    assert res.exit_code == 2 and "made by coder" in res.output and "--rerank" in res.output
    res = run("explain", "--index", "idx", "--row", "1", ok=False)
    assert res.exit_code == 2 and "--predictions" in res.output
    res = run("explain", "--index", "idx", "--predictions", out, "--row", "99", ok=False)
    assert res.exit_code == 1 and "no row 99" in res.output


def test_shard_url_and_listed_rows_are_explained(methods_env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    samples = [p for p in photos(6) if not p[0].startswith("png")]
    shards = write_shards(tmp_path / "shards", samples, per_shard=3)
    (tmp_path / "gz").mkdir()
    for s in shards:
        (tmp_path / "gz" / (s.name + ".gz")).write_bytes(gzip.compress(s.read_bytes()))
    (tmp_path / "files").mkdir()
    for key, data in samples[:2]:
        (tmp_path / "files" / f"{key}.jpg").write_bytes(data)
    (tmp_path / "list.txt").write_text("files/" + "\nfiles/".join(f"{k}.jpg" for k, _ in samples[:2]) + "\n")
    with FileServer(tmp_path / "shards") as server:
        cases = {"tar": ["shards"], "gz": ["gz"], "http": [server.base_url + "/{00000..00001}.tar"],
                 "files": ["--files-from", "list.txt"]}
        for name, inputs in cases.items():
            out = tmp_path / f"{name}.csv"
            run("classify", *inputs, "--index", methods_env / "idx", "--out", out, "--workers", "0", "-q")
            rows = rows_of(out)
            res = run("explain", "--index", methods_env / "idx", "--predictions", out, "--json",
                      *[a for n in range(1, len(rows) + 1) for a in ("--row", str(n))])
            explained = json.loads(res.stdout)
            assert [e["prediction"] for e in explained] == [r["label"] for r in rows], name
            # a row named directly (SHARD/KEY, a URL, a file) is explained as well
            res = run("explain", rows[0]["path"], "--index", methods_env / "idx", "--predictions", out, "--json")
            assert json.loads(res.stdout)[0]["prediction"] == rows[0]["label"], name


def test_coder_star_rows_show_what_decided_them(methods_env, tmp_path, monkeypatch):
    """A CODER* row's label is its visible winner (its score the highest: the rerank's probability),
    and CODER's own first class and probability are given beside it, named stage1_label/stage1_score."""
    monkeypatch.chdir(methods_env)
    star, plain = tmp_path / "star.csv", tmp_path / "plain.csv"
    run("classify", "images", "--index", "idx", "--out", star, "--workers", "0", "--rerank", "--llm", "none", "-q")
    run("classify", "images", "--index", "idx", "--out", plain, "--workers", "0", "-q")
    header = star.read_text().splitlines()[0]
    assert header.startswith('"path","label","score","method","stage1_label","stage1_score","label_2"')
    assert "stage1" not in plain.read_text().splitlines()[0]  # only CODER* rows carry them
    stage1 = {r["path"]: r for r in rows_of(plain)}
    for r in rows_of(star):
        labels, scores = csv_ranking(r)
        assert scores == sorted(scores, reverse=True), r  # bars follow the rerank
        assert r["stage1_label"] == stage1[r["path"]]["label"]
        assert abs(float(r["stage1_score"]) - float(stage1[r["path"]]["score"])) <= SCORE_ATOL
