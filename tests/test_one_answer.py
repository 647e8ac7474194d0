"""One answer for an image, everywhere: its row of a classify run, its row explained by the CLI, by the
server (by row and by upload) and by the Python API show the same class and scores, for every method;
X-MoRe's answer for an image does not depend on the other images of its run (the corpus's own
normalisers); a row whose name is not UTF-8 is read back by every reader."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import run_cli
from scores import SCORE_ATOL, csv_ranking
from test_explain_rows import METHODS

run = run_cli  # conftest's: the command line in this process, as a user types it


def rows_of(out: Path) -> list[dict]:
    with open(out, newline="", encoding="utf-8", errors="surrogateescape") as f:
        return list(csv.DictReader(f))


def assert_same(row: dict, labels_scores: list[tuple[str, float]], what: str) -> None:
    """An explanation's (or another row's) classes agree with the row: its label first, each of the
    row's classes within SCORE_ATOL."""
    labels, scores = csv_ranking(row)
    got = dict(labels_scores)
    assert labels_scores[0][0] == row["label"], (what, row["path"], labels_scores[:3], labels[:3])
    for label, score in zip(labels, scores, strict=True):
        assert abs(got[label] - score) <= SCORE_ATOL, (what, row["path"], label, got[label], score)


def classes(explained: dict) -> list[tuple[str, float]]:
    return [(c["class"], c["score"]) for c in explained["classes"]]


def serve_config(root: Path, method: str, out: Path):  # noqa: ANN201 - a ServeConfig with the run's method
    from coder_index.serve import ServeConfig

    extra = {"coder": {}, "coder*": {"rerank": True}, "adapter": {"adapter": root / "adapter"},
             "xmore": {"method": "xmore", "corpus": root / "corpus"},
             "coder+xmore": {"method": "coder+xmore", "corpus": root / "corpus"}}[method]
    return ServeConfig(index=root / "idx", predictions=out, top_k=3, **extra)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_view_of_every_row_is_that_row(methods_env, tmp_path, monkeypatch, method):
    pytest.importorskip("fastapi", reason="serve needs its extra: pip install -e '.[serve]'")
    import httpx

    from coder_index import TextIndex
    from coder_index.pipeline.rows import run_scorer
    from coder_index.serve import create_app
    from coder_index.serve.background import BackgroundServer

    monkeypatch.chdir(methods_env)
    out = tmp_path / "p.csv"
    extra = [a.replace("{root}", str(methods_env)) for a in METHODS[method]]
    run("classify", "images", "--index", "idx", "--out", out, "--workers", "0", "--top-k", "3", "-q", *extra)
    rows = rows_of(out)
    assert len(rows) == 9
    # the CLI, by row
    res = run("explain", "--index", "idx", "--predictions", out, "--json",
              *[a for n in range(1, len(rows) + 1) for a in ("--row", str(n))])
    for row, e in zip(rows, json.loads(res.stdout), strict=True):
        assert_same(row, classes(e), "explain --row")
    # the Python API: the run's own scorer
    index = TextIndex.open(methods_env / "idx")
    api = index.explain([methods_env / r["path"] for r in rows], k=3, scorer=run_scorer(index, out, top_k=3))
    for row, e in zip(rows, api, strict=True):
        assert_same(row, classes(e), "python")
    # the server: by row, and the same image uploaded (a server started with the run's method)
    app = create_app(serve_config(methods_env, method, out))
    with BackgroundServer(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        listed = client.get("/api/predictions", params={"limit": 100}).json()["rows"]
        assert len(listed) == 9
        for i, row in enumerate(rows):
            by_row = client.get("/api/predictions/explain", params={"row": i}).json()[0]
            assert_same(row, classes(by_row), "serve by row")
            blob = (methods_env / row["path"]).read_bytes()
            up = client.post("/api/explain", files=[("files", ("x.png", blob, "image/png"))]).json()[0]
            assert_same(row, classes(up), "serve upload /api/explain")
            got = client.post("/api/classify", files=[("files", ("x.png", blob, "image/png"))]).json()[0]
            assert_same(row, [(t["label"], t["score"]) for t in got["top_k"]], "serve upload /api/classify")


@pytest.mark.parametrize("method", ["xmore", "coder+xmore"])
def test_an_xmore_answer_is_the_images_own_whatever_its_company(methods_env, tmp_path, monkeypatch, method):
    """The folder, a subset of it, one image alone and a resumed run of a changed folder give each
    image the same probabilities (the corpus's normalisers); the normalisers are kept with the corpus."""
    monkeypatch.chdir(methods_env)
    args = ["--index", "idx", "--corpus", "corpus", "--method", method, "--workers", "0", "--top-k", "3", "-q"]
    run("classify", "images", "--out", tmp_path / "all.csv", *args)
    full = {r["path"]: r for r in rows_of(tmp_path / "all.csv")}
    run("classify", "images/red", "--out", tmp_path / "red.csv", *args)
    one = sorted(full)[4]
    run("classify", one, "--out", tmp_path / "one.csv", *args)
    for part in ("red.csv", "one.csv"):
        for r in rows_of(tmp_path / part):
            assert_same(full[r["path"]], list(zip(*csv_ranking(r), strict=True)), part)
    # a resumed run of a folder that changed: the rows of the first part and of the second agree too
    grown = tmp_path / "grown"
    shutil.copytree(methods_env / "images" / "green", grown / "green")
    run("classify", grown, "--out", tmp_path / "grown.csv", *args)
    shutil.copytree(methods_env / "images" / "blue", grown / "blue")
    run("classify", grown, "--out", tmp_path / "grown.csv", *args)
    for r in rows_of(tmp_path / "grown.csv"):
        same_image = f"images/{Path(r['path']).parent.name}/{Path(r['path']).name}"
        assert_same(full[same_image], list(zip(*csv_ranking(r), strict=True)), "resumed")
    kept = json.loads((methods_env / "corpus" / "calibration.json").read_text())["entries"]
    assert any(e["key"]["method"] == method for e in kept)
    record = json.loads((tmp_path / "all.csv.run.json").read_text())["provenance"]
    assert record["normalizer"] == "corpus" and len(record["normalizers"]) == 2
    # another normaliser on the same OUT is refused: a resumed file never mixes them
    res = run("classify", "images", "--out", tmp_path / "all.csv", *args, "--xmore-normalizer", "set", ok=False)
    assert res.exit_code == 1 and "--xmore-normalizer" in res.output


def test_the_set_normaliser_is_still_offered_and_explained_with_the_runs_own(methods_env, tmp_path, monkeypatch):
    monkeypatch.chdir(methods_env)
    out = tmp_path / "set.csv"
    run("classify", "images", "--index", "idx", "--out", out, "--corpus", "corpus", "--method", "xmore",
        "--xmore-normalizer", "set", "--workers", "0", "-q")
    assert "normalizers" in json.loads(out.with_name("set.csv.run.json").read_text())["state"]
    row = rows_of(out)[4]
    alone = json.loads(run("explain", "--index", "idx", "--predictions", out, "--row", "5", "--json").stdout)[0]
    assert_same(row, classes(alone), "explain of a set run")


def test_a_row_whose_name_is_not_utf8_is_read_back_everywhere(methods_env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "odd"
    folder.mkdir()
    name = os.fsdecode(b"caf\xe9-\xff.png")  # Latin-1 bytes: not UTF-8
    shutil.copy(methods_env / "images" / "red" / "0.png", folder / name)
    for fmt in ("csv", "jsonl"):
        out = tmp_path / f"p.{fmt}"
        run("classify", "odd", "--index", methods_env / "idx", "--out", out, "--workers", "0", "-q")
        res = run("explain", "--index", methods_env / "idx", "--predictions", out, "--row", "1", "--json")
        assert json.loads(res.stdout)[0]["prediction"]
        from coder_index.pipeline.predictions_file import read_rows

        assert [r.path for r in read_rows(out)] == [f"odd/{name}"]
        # a rerun resumes: the row is found, not classified again
        res = run("classify", "odd", "--index", methods_env / "idx", "--out", out, "--workers", "0", "-q")
        assert "classified 0 images" in res.output and "1 done in earlier runs" in res.output
