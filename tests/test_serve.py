"""`coder-index serve`: the API over HTTP against a running server (uvicorn on 127.0.0.1), equal to the
CLI's output; limits, bad uploads, path safety of the predictions browser, secrets, batching."""

from __future__ import annotations

import asyncio
import io
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
import httpx  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from PIL import Image  # noqa: E402

from coder_index.pipeline.output import ResultWriter  # noqa: E402
from coder_index.serve import ServeConfig, create_app  # noqa: E402
from coder_index.serve.background import BackgroundServer  # noqa: E402
from coder_index.serve.service import redact  # noqa: E402
from coder_index.serve.worker import Job, ModelWorker  # noqa: E402
from coder_index_cli.main import cli  # noqa: E402

from images import GOOD  # noqa: E402
from scores import assert_close_tree, assert_same_ranking  # noqa: E402
from serve_env import SAMPLES, make_serve_env, run_cli  # noqa: E402

SECRET = "sk-serve-test-SECRET-0123456789"
LIMITS = {"max_file_bytes": 2 * 1024 * 1024, "max_files": 16, "max_pixels": 4_000_000}


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model):
    os.environ["OPENAI_API_KEY"] = SECRET  # whatever the environment holds never reaches a response
    try:
        yield make_serve_env(tmp_path_factory.mktemp("serve"), tiny_model)
    finally:
        os.environ.pop("OPENAI_API_KEY", None)


@pytest.fixture(scope="module")
def server(env):
    app = create_app(ServeConfig(index=env["index"], predictions=env["preds"], images_root=env["root"],
                                 report=env["report"], **LIMITS))
    with BackgroundServer(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        client.app = app
        yield client


@pytest.fixture(scope="module")
def rerank_server(env):
    app = create_app(ServeConfig(index=env["index"], rerank=True, predictions=env["preds_rerank"],
                                 images_root=env["root"], **LIMITS))
    with BackgroundServer(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        yield client


def upload(*paths: Path) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]


def same_rows(api_rows, cli_rows):
    """The server's rows equal the CLI's: the same rankings, scores within SCORE_ATOL (the server
    encodes a request's images as one batch, the CLI its own batches: see tests/scores.py)."""
    assert len(api_rows) == len(cli_rows)
    for a, c in zip(api_rows, cli_rows, strict=True):
        assert a["method"] == c["method"]
        assert_same_ranking([t["label"] for t in a["top_k"]], [t["score"] for t in a["top_k"]],
                            [t["label"] for t in c["top_k"]], [t["score"] for t in c["top_k"]], what=a["path"])


def cli_jsonl(env, out: str, *extra: str) -> dict[str, dict]:
    run_cli("classify", "photos", "--index", env["index"], "--out", out, "--workers", "0", "-q", *extra,
            cwd=env["root"])
    return {r["path"]: r for r in map(json.loads, (env["root"] / out).read_text().splitlines())}


# ---------------------------------------------------------------------------------------------- API = CLI
def test_classify_equals_the_cli_rows_for_the_same_files(server, env):
    cli_rows = cli_jsonl(env, "cli.jsonl")
    files = [env["photos"] / g for g in GOOD] + [env["photos"] / s for s in SAMPLES]
    res = server.post("/api/classify", files=upload(*files))
    assert res.status_code == 200, res.text
    rows = res.json()
    assert [r["path"] for r in rows] == [f.name for f in files]  # uploads keep their order and names
    same_rows(rows, [cli_rows["photos/" + f.relative_to(env["photos"]).as_posix()] for f in files])


def test_rerank_server_equals_cli_rerank(rerank_server, env):
    cli_rows = cli_jsonl(env, "cli-rerank.jsonl", "--rerank", "--llm", "none")
    files = [env["photos"] / g for g in GOOD]
    rows = rerank_server.post("/api/classify", files=upload(*files)).json()
    assert {r["method"] for r in rows} == {"coder*"}
    same_rows(rows, [cli_rows["photos/" + g] for g in GOOD])
    assert any(r["label"] != r["stage1"]["label"] for r in rows), "no prediction changed: weak fixture"
    # what decided shows: the reranked class is the visible winner, CODER's first is named beside it
    assert all(r["top_k"][0]["score"] >= r["top_k"][1]["score"] for r in rows)


def test_explain_equals_explain_json(server, env):
    files = [env["photos"] / "a/red_0.jpg", env["photos"] / SAMPLES[0]]
    api = server.post("/api/explain?k=4", files=upload(*files)).json()
    cli_out = json.loads(run_cli("explain", *files, "--index", env["index"], "-k", "4", "--json"))
    for a, c, f in zip(api, cli_out, files, strict=True):
        assert a["path"] == f.name and c["path"] == str(f)
        a.pop("path"), c.pop("path")
        assert_close_tree(a, c)
        assert len(a["nearest_texts"]) == 4 and a["runner_up"] == a["classes"][1]["class"]
        assert a["runner_up_texts"] and {t["class"] for t in a["runner_up_texts"]} == {a["runner_up"]}
        assert a["pairs"] is not None  # the index holds pair texts for every pair of classes
    human = run_cli("explain", files[0], "--index", env["index"], "-k", "2")
    assert f"best texts of the runner-up, {api[0]['runner_up']}" in human
    assert f"CODER* pairs (score > 0 favours the first class): rerank picks {api[0]['pairs']['prediction']}" in human


def test_pair_evidence_agrees_with_the_rerank(rerank_server, env):
    """The explanation's pick is the rerank's pick for every image, and its pair scores are the
    differences of mean cosines, recomputed here from the index's pair texts."""
    from coder_index import TextIndex
    from coder_index.core.decode import load_image

    files = [env["photos"] / g for g in GOOD]
    rows = rerank_server.post("/api/classify", files=upload(*files)).json()
    why = rerank_server.post("/api/explain", files=upload(*files)).json()
    assert [w["pairs"]["prediction"] for w in why] == [r["label"] for r in rows]
    assert any(w["pairs"]["changed"] for w in why)
    index = TextIndex.open(env["index"])
    names = index.class_names()
    x = index.encoder.encode_images([load_image(files[0])])[0]
    for p in why[0]["pairs"]["pairs"]:
        a, b = names.index(p["a"]), names.index(p["b"])
        emb = index.pair_embeddings([(a, b), (b, a)])
        expect = float(x @ emb[(a, b)].mean(0) - x @ emb[(b, a)].mean(0))
        assert p["score"] == pytest.approx(expect, abs=1e-5)
        assert p["a_over_b"] and all(t["text"] for t in p["a_over_b"])


def test_texts_and_info_equal_the_cli(server, env):
    api = server.get("/api/texts", params={"q": "a fluffy white dog", "k": 5}).json()
    cli_out = json.loads(run_cli("texts", "a fluffy white dog", "--index", env["index"], "-k", "5", "--json"))
    assert_close_tree(api, cli_out)
    assert len(api) == 5
    info = server.get("/api/info").json()
    cli_info = json.loads(run_cli("info", env["index"], "--json"))
    server_part = info.pop("server")
    assert {k: v for k, v in info.items() if k != "path"} == {k: v for k, v in cli_info.items() if k != "path"}
    assert server_part["method"] == "coder" and server_part["limits"]["max_files"] == LIMITS["max_files"]


def test_openapi_documents_every_endpoint(server):
    spec = server.get("/openapi.json").json()
    for path in ("/api/classify", "/api/explain", "/api/texts", "/api/info", "/api/predictions",
                 "/api/predictions/image", "/api/predictions/explain", "/api/report"):
        assert path in spec["paths"], path
    body = spec["paths"]["/api/classify"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body


# ---------------------------------------------------------------------------------------------- bad uploads
def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (w, h)).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def _jpeg(seed: int = 0, size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def assert_still_serving(server):
    res = server.post("/api/classify", files=[("files", ("ok.jpg", _jpeg(), "image/jpeg"))])
    assert res.status_code == 200 and res.json()[0]["label"]


@pytest.mark.parametrize("name,data,status,words", [
    ("notes.jpg", b"just some text, not pixels", 400, "not an image"),
    ("empty.png", b"", 400, "empty file"),
    ("huge.png", _png(2100, 2000), 413, "pixels"),
    ("bomb.png", _png(12000, 12000), 413, "pixels"),
    ("html.jpg", b"<html><script>alert(1)</script></html>", 400, "not an image"),
])
def test_bad_uploads_get_a_clear_4xx_and_the_server_keeps_serving(server, name, data, status, words):
    res = server.post("/api/classify", files=[("files", (name, data, "image/png"))])
    assert res.status_code == status, res.text
    body = res.json()
    assert words in body["detail"] and name in body["detail"]
    assert body["errors"][0]["file"] == name
    assert_still_serving(server)


def test_every_truncation_of_an_image_is_a_4xx_or_a_row_never_a_5xx(server):
    data = _jpeg(seed=3, size=48)
    cuts = sorted(set(range(0, len(data), max(1, len(data) // 60))) | {1, 2, 3, len(data) - 2, len(data) - 1})
    statuses = {}
    for cut in cuts:
        res = server.post("/api/explain", files=[("files", ("cut.jpg", data[:cut], "image/jpeg"))])
        statuses[cut] = res.status_code
        assert res.status_code in (200, 400), (cut, res.text)
        if res.status_code == 400:
            assert "cut.jpg" in res.json()["detail"]
    assert sum(s == 400 for s in statuses.values()) > len(cuts) // 2
    assert_still_serving(server)


def test_one_bad_file_among_good_ones_names_it(server, env):
    files = upload(env["photos"] / "a/red_0.jpg") + [("files", ("broken.jpg", b"\xff\xd8\xff\xe0 garbage", "x"))]
    res = server.post("/api/classify", files=files)
    assert res.status_code == 400
    assert [e["index"] for e in res.json()["errors"]] == [1]


def test_size_and_count_limits(server):
    big = b"\xff\xd8" + os.urandom(LIMITS["max_file_bytes"] + 10)
    res = server.post("/api/classify", files=[("files", ("big.jpg", big, "image/jpeg"))])
    assert res.status_code == 413 and "big.jpg" in res.json()["detail"]
    many = [("files", (f"{i}.jpg", _jpeg(i, 16), "image/jpeg")) for i in range(LIMITS["max_files"] + 1)]
    res = server.post("/api/classify", files=many)
    assert res.status_code == 413 and "at most" in res.json()["detail"]
    res = server.post("/api/classify", data={"other": "x"})
    assert res.status_code == 422
    assert_still_serving(server)


def test_request_body_limit_also_holds_without_a_content_length(server):
    limit = server.app.state.service.config.max_request_bytes

    def chunks():
        boundary = b"--xyz\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.jpg\"\r\n\r\n"
        yield boundary
        for _ in range(limit // (1 << 20) + 2):
            yield b"\0" * (1 << 20)

    res = server.post("/api/classify", content=chunks(),
                      headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert res.status_code == 413
    # a declared length past the limit is refused before any of the body is read
    import socket

    with socket.create_connection((server.base_url.host, server.base_url.port), timeout=30) as s:
        s.sendall(b"POST /api/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                  b"boundary=xyz\r\nContent-Length: " + str(limit + 1).encode() + b"\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 413")
    assert_still_serving(server)


def test_text_query_errors(server):
    assert server.get("/api/texts").status_code == 422
    assert server.get("/api/texts", params={"q": "   "}).status_code == 400
    assert server.get("/api/texts", params={"q": "dog", "k": 0}).status_code == 422


# ---------------------------------------------------------------------------------------------- predictions
def test_predictions_filters_sort_and_pages(server, env):
    import csv

    with open(env["preds"], newline="") as f:
        file_labels = {r["path"]: r["label"] for r in csv.DictReader(f)}
    all_rows = server.get("/api/predictions", params={"limit": 500}).json()
    n = len(GOOD) + len(SAMPLES)
    assert all_rows["total"] == n
    summary = server.get("/api/predictions/summary").json()
    assert summary["rows"] == n and sum(x["count"] for x in summary["labels"]) == n
    label = summary["labels"][0]["label"]
    page = server.get("/api/predictions", params={"label": label}).json()
    assert page["total"] == summary["labels"][0]["count"] and {r["label"] for r in page["rows"]} == {label}
    low = server.get("/api/predictions", params={"sort": "score", "limit": 500}).json()["rows"]
    scores = [r["score"] for r in low]
    assert scores == sorted(scores)
    mid = float(np.median(scores))
    band = server.get("/api/predictions", params={"min_score": 0.0, "max_score": mid, "limit": 500}).json()
    assert band["total"] == sum(s <= mid for s in scores)
    first = server.get("/api/predictions", params={"limit": 3, "offset": 0}).json()["rows"]
    second = server.get("/api/predictions", params={"limit": 3, "offset": 3}).json()["rows"]
    assert [r["path"] for r in first + second] == [r["path"] for r in all_rows["rows"][:6]]
    assert server.get("/api/predictions", params={"sort": "nonsense"}).status_code == 422
    assert server.get("/api/predictions", params={"q": "/a/"}).json()["total"] == 3
    assert {r["path"]: r["label"] for r in all_rows["rows"]} == file_labels


def test_changed_by_rerank_filter(rerank_server, env):
    lines = [json.loads(x) for x in env["preds_rerank"].read_text().splitlines()]
    changed = {r["path"] for r in lines if r["label"] != r["stage1"]["label"]}
    assert changed
    page = rerank_server.get("/api/predictions", params={"changed": "true", "limit": 500}).json()
    assert {r["path"] for r in page["rows"]} == changed and all(r["changed"] for r in page["rows"])
    page = rerank_server.get("/api/predictions", params={"changed": "false", "limit": 500}).json()
    assert not {r["path"] for r in page["rows"]} & changed


def test_predictions_file_is_read_again_as_it_grows(server, env):
    before = server.get("/api/predictions/summary").json()["rows"]
    preds = env["preds"]
    original = preds.read_bytes()
    try:
        w = ResultWriter(preds, 5)
        row = {"path": "photos/gray.png", "label": "pug", "score": 0.5, "method": "coder",
               "top_k": [{"label": "pug", "score": 0.5}, {"label": "beagle", "score": 0.2}]}
        w.write([{**row, "path": "photos/new-1.png"}])
        w.close()
        with open(preds, "ab") as f:
            f.write(b'"photos/half-writ')  # an interrupted record: not read until complete
        assert server.get("/api/predictions/summary").json()["rows"] == before + 1
    finally:
        preds.write_bytes(original)
    assert server.get("/api/predictions/summary").json()["rows"] == before


def test_thumbnails_and_explanations_of_listed_images(server, env):
    path = "photos/" + SAMPLES[0]
    res = server.get("/api/predictions/image", params={"path": path, "size": 128})
    assert res.status_code == 200 and res.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(res.content)).size) == 128
    assert server.get("/api/predictions/image", params={"path": path, "size": 77}).status_code == 422
    why = server.get("/api/predictions/explain", params={"path": path, "k": 3}).json()
    cli_out = json.loads(run_cli("explain", env["photos"] / SAMPLES[0], "--index", env["index"], "-k", "3", "--json"))
    assert why[0]["prediction"] == cli_out[0]["prediction"] and why[0]["path"] == path


@pytest.fixture(scope="module")
def traversal(env, tmp_path_factory):
    """A predictions file that lists files outside the root in every way a path can get there."""
    outside = tmp_path_factory.mktemp("outside") / "secret.jpg"
    outside.write_bytes(_jpeg(9))
    root = env["root"]
    inside = root / "photos" / SAMPLES[1]
    (root / "photos" / "link-out.jpg").symlink_to(outside)
    (root / "photos" / "link-in.jpg").symlink_to(inside)
    (root / "photos" / "dirlink").symlink_to(outside.parent, target_is_directory=True)
    (root / "photos" / "fifo.jpg").unlink(missing_ok=True)
    os.mkfifo(root / "photos" / "fifo.jpg")
    rel_out = os.path.relpath(outside, root)
    listed = {"ok": f"photos/{SAMPLES[1]}", "dotdot": rel_out, "abs_out": str(outside), "abs_in": str(inside),
              "link_out": "photos/link-out.jpg", "link_in": "photos/link-in.jpg",
              "dirlink": "photos/dirlink/secret.jpg",
              "inner_dotdot": f"photos/a/../{SAMPLES[1]}", "escape_dotdot": "photos/../../" + outside.name,
              "fifo": "photos/fifo.jpg", "missing": "photos/gone.jpg", "dir": "photos/a"}
    preds = root / "traversal.csv"
    w = ResultWriter(preds, 2)
    w.write([{"path": p, "label": "pug", "score": 0.9, "method": "coder",
              "top_k": [{"label": "pug", "score": 0.9}, {"label": "beagle", "score": 0.1}]} for p in listed.values()])
    w.close()
    app = create_app(ServeConfig(index=env["index"], predictions=preds, images_root=root, **LIMITS))
    with BackgroundServer(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client, listed


@pytest.mark.parametrize("case,status", [
    ("ok", 200), ("abs_in", 200), ("link_in", 200), ("inner_dotdot", 200),
    ("dotdot", 403), ("abs_out", 403), ("link_out", 403), ("dirlink", 403), ("escape_dotdot", 403),
    ("fifo", 422), ("missing", 422), ("dir", 422),
])
def test_only_listed_images_inside_the_root_are_served(traversal, case, status):
    client, listed = traversal
    for endpoint in ("/api/predictions/image", "/api/predictions/explain"):
        res = client.get(endpoint, params={"path": listed[case]})
        assert res.status_code == status, (endpoint, case, res.text)
        if status == 200 and endpoint.endswith("image"):
            assert res.headers["content-type"] == "image/jpeg"
        if status == 403:
            assert b"\xff\xd8" not in res.content and "outside --images-root" in res.json()["detail"]


@pytest.mark.parametrize("path", ["/etc/passwd", "../../../../etc/passwd", "photos/../../etc/passwd",
                                  "photos/a/red_0.jpg\x00.png", "photos/nothere.jpg", "", "photos"])
def test_unlisted_paths_are_404(traversal, path):
    client, _ = traversal
    res = client.get("/api/predictions/image", params={"path": path})
    assert res.status_code == 404, res.text


def test_a_server_without_predictions_says_how_to_add_them(env):
    app = create_app(ServeConfig(index=env["index"]))
    with BackgroundServer(app) as url, httpx.Client(base_url=url) as client:
        res = client.get("/api/predictions")
        assert res.status_code == 404 and "--predictions" in res.json()["detail"]
        assert client.get("/api/report").status_code == 404


# ---------------------------------------------------------------------------------------------- report
def test_report_is_served_without_server_paths(server, env):
    rep = server.get("/api/report").json()
    on_disk = json.loads((env["report"] / "report.json").read_text())
    assert rep["per_class"] == on_disk["per_class"] and rep["confused"] == on_disk["confused"]
    assert rep["has_tsne"] and "tsne" not in rep
    png = server.get("/api/report/tsne.png")
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")


# ---------------------------------------------------------------------------------------------- safety
def test_no_secret_in_any_response(server, env):
    responses = [server.get(p) for p in ("/api/info", "/openapi.json", "/", "/static/app.js", "/api/report",
                                          "/api/predictions", "/api/predictions/summary")]
    responses.append(server.get("/api/texts", params={"q": "cat"}))
    responses.append(server.post("/api/classify", files=[("files", ("x.jpg", b"nope", "image/jpeg"))]))
    responses.append(server.post("/api/explain", files=upload(env["photos"] / "gray.png")))
    for res in responses:
        assert SECRET not in res.text
        assert "OPENAI_API_KEY" not in res.text


def test_redact_hides_secret_like_keys_at_any_depth():
    data = {"llm": {"api_key": SECRET, "model": "m", "nested": [{"Authorization": "Bearer x", "ok": 1}]},
            "token_count": 3}
    out = redact(data)
    assert SECRET not in json.dumps(out) and "Bearer" not in json.dumps(out)
    assert out["llm"]["model"] == "m" and out["llm"]["nested"][0]["ok"] == 1


def test_requests_for_other_host_names_are_refused_on_loopback(server):
    assert server.get("/api/info", headers={"host": "attacker.example:8000"}).status_code == 400
    assert server.get("/api/info", headers={"host": "localhost:1234"}).status_code == 200


def test_page_is_self_contained(server):
    html = server.get("/").text
    assert "/static/app.js" in html and "http://" not in html and "https://" not in html
    js = server.get("/static/app.js").text
    assert "https://" not in js and "innerHTML" not in js
    assert "default-src 'self'" in server.get("/").headers["content-security-policy"]


# ---------------------------------------------------------------------------------------------- concurrency
def test_concurrent_requests_all_succeed_and_agree(server, env):
    data = (env["photos"] / "a/red_0.jpg").read_bytes()
    expected = server.post("/api/classify", files=[("files", ("r.jpg", data, "image/jpeg"))]).json()[0]

    async def burst(n: int):
        async with httpx.AsyncClient(base_url=str(server.base_url), timeout=120,
                                     limits=httpx.Limits(max_connections=n)) as client:
            return await asyncio.gather(*[client.post("/api/classify", files=[("files", ("r.jpg", data, "image/jpeg"))])
                                          for _ in range(n)])

    before = server.get("/api/info").json()["server"]
    results = asyncio.run(asyncio.wait_for(burst(200), timeout=300))  # bounded in count and in time
    assert [r.status_code for r in results] == [200] * 200
    for r in results:
        row = r.json()[0]
        # concurrent requests are encoded together: another batch, the same ranking (tests/scores.py)
        assert_same_ranking([t["label"] for t in row["top_k"]], [t["score"] for t in row["top_k"]],
                            [t["label"] for t in expected["top_k"]], [t["score"] for t in expected["top_k"]])
    after = server.get("/api/info").json()["server"]
    assert after["images"] - before["images"] == 200


def test_worker_encodes_waiting_requests_together():
    """Jobs that queue while the model is busy share one forward pass; each gets its own rows."""
    import torch

    gate, busy, calls = threading.Event(), threading.Event(), []

    def encode(pixels):
        calls.append(len(pixels))
        busy.set()
        gate.wait(10)
        return pixels.reshape(len(pixels), -1).numpy()

    worker = ModelWorker(encode, max_batch=64)
    try:
        first = worker.submit(Job(pixels=torch.zeros(1, 2), finish=lambda e: e.sum()))
        assert busy.wait(60)  # the model is busy with the first job: the next ones queue
        rowwise = lambda e: list(e[:, 0])  # noqa: E731
        futures = [worker.submit(Job(pixels=torch.full((2, 2), float(i)), rowwise=rowwise)) for i in range(10)]
        gate.set()
        assert first.result(10) == 0
        assert [f.result(10) for f in futures] == [[float(i), float(i)] for i in range(10)]
        assert calls == [1, 20]
        failing = worker.submit(Job(pixels=torch.zeros(1, 2), finish=lambda e: 1 / 0))
        with pytest.raises(ZeroDivisionError):
            failing.result(10)
        assert worker.submit(Job(call=lambda: "alive")).result(10) == "alive"
    finally:
        worker.close()


# ---------------------------------------------------------------------------------------------- CLI
def test_serve_help_has_examples():
    out = CliRunner().invoke(cli, ["serve", "--help"]).output
    assert "Examples:" in out and "--images-root" in out and "127.0.0.1" in out


def test_serve_warns_loudly_off_loopback_and_refuses_bad_options(env, monkeypatch):
    import uvicorn

    ran = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: ran.append(sockets))
    res = CliRunner().invoke(cli, ["serve", str(env["index"]), "--host", "0.0.0.0", "--port", "0"])
    assert res.exit_code == 0, res.output  # off loopback: a token is made and required, no warning needed
    assert "WARNING" not in res.stderr and "?token=" in res.stderr and ran
    res = CliRunner().invoke(cli, ["serve", str(env["index"]), "--host", "0.0.0.0", "--port", "0", "--no-token"])
    assert res.exit_code == 0, res.output
    assert "WARNING" in res.stderr and "--no-token" in res.stderr and "?token=" not in res.stderr
    res = CliRunner().invoke(cli, ["serve", str(env["index"]), "--port", "0"])
    assert "WARNING" not in res.stderr and "http://127.0.0.1:" in res.stderr
    # --predictions alone: the run record says where classify ran and what it read; no guess needed
    res = CliRunner().invoke(cli, ["serve", str(env["index"]), "--predictions", str(env["preds"]), "--port", "0"])
    assert res.exit_code == 0 and "warning" not in res.stderr, res.output
    res = CliRunner().invoke(cli, ["serve", str(env["index"]), "--images-root", str(env["root"])])
    assert res.exit_code == 2 and "--predictions" in res.output


def test_serve_refuses_a_taken_port_clearly(env):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        res = CliRunner().invoke(cli, ["serve", str(env["index"]), "--port", str(port)])
    assert res.exit_code == 1 and f"cannot listen on 127.0.0.1:{port}" in res.output


def test_ctrl_c_stops_the_server_without_talk_of_resuming(env):
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "coder_index_cli.main", "serve", str(env["index"]), "--port", "0"],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        line = ""
        while "serving" not in line and time.time() < deadline and proc.poll() is None:
            line = proc.stderr.readline()
        assert "serving" in line, line
        url = line.split(" at ")[1].split("/ ")[0]
        assert httpx.get(url + "/api/info", timeout=30).status_code == 200
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "server stopped" in err and "resume" not in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------- odd files
def test_names_that_are_not_utf8_or_hold_newlines_are_served_by_row(env, tmp_path):
    root = tmp_path / "root"
    (root / "photos").mkdir(parents=True)
    odd = {"photos/caf\udce9.jpg": env["photos"] / "a/red_0.jpg",
           "photos/new\nline, \"q\".jpg": env["photos"] / "gray.png"}
    for name, src in odd.items():
        (root / name).write_bytes(src.read_bytes())
    for suffix in (".csv", ".jsonl"):
        preds = tmp_path / f"odd{suffix}"
        w = ResultWriter(preds, 2)
        w.write([{"path": p, "label": "pug", "score": 0.9, "method": "coder",
                  "top_k": [{"label": "pug", "score": 0.9}, {"label": "beagle", "score": 0.1}]} for p in odd])
        w.close()
        app = create_app(ServeConfig(index=env["index"], predictions=preds, images_root=root))
        with BackgroundServer(app) as url, httpx.Client(base_url=url, timeout=60) as client:
            rows = client.get("/api/predictions").json()["rows"]
            assert [r["path"] for r in rows] == ["photos/caf\ufffd.jpg", "photos/new\nline, \"q\".jpg"]
            for r in rows:
                res = client.get("/api/predictions/image", params={"row": r["row"]})
                assert res.status_code == 200 and res.headers["content-type"] == "image/jpeg"
                assert client.get("/api/predictions/explain", params={"row": r["row"], "k": 1}).status_code == 200
            assert client.get("/api/predictions/image", params={"path": rows[1]["path"]}).status_code == 200
            assert client.get("/api/predictions/image", params={"row": 2}).status_code == 404
            assert client.get("/api/predictions/image").status_code == 422
            name = "caf\xe9 \u732b.jpg"
            res = client.post("/api/classify", files=[("files", (name, odd["photos/caf\udce9.jpg"].read_bytes(), "x"))])
            assert res.status_code == 200 and res.json()[0]["path"] == name


def test_a_predictions_file_deleted_or_replaced_while_served(env, tmp_path):
    preds = tmp_path / "p.csv"
    preds.write_bytes(env["preds"].read_bytes())
    app = create_app(ServeConfig(index=env["index"], predictions=preds, images_root=env["root"]))
    with BackgroundServer(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        n = client.get("/api/predictions/summary").json()["rows"]
        preds.unlink()
        assert client.get("/api/predictions/summary").json()["rows"] == n  # what was read stays served
        preds.write_text("this is not a predictions file\n")
        res = client.get("/api/predictions")
        assert res.status_code == 422 and "not a coder-index predictions file" in res.json()["detail"]
        assert client.get("/api/info").status_code == 200


# ---------------------------------------------------------------------------------------------- other methods
@pytest.fixture(scope="module")
def adapter_and_corpus(env, tmp_path_factory):
    from conftest import PET_CLASSES

    root = tmp_path_factory.mktemp("methods")
    rng = np.random.default_rng(5)
    for c in PET_CLASSES:
        (root / "train" / c).mkdir(parents=True)
        for j in range(4):  # 2 shots, 2 for the search's validation
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "train" / c / f"{j}.png")
    run_cli("fewshot", "fit", root / "train", "--index", env["index"], "--shots", "2", "--out", root / "adapter",
            "--augment-epochs", "1", "--workers", "0", "--search", "fast")
    caps = root / "caps.csv"
    caps.write_text("path,caption\n" + "".join(f"{c}/{j}.png,a photo of a {c}\n"
                                               for c in PET_CLASSES for j in range(4)))
    run_cli("corpus", "build", root / "corpus", "--images", root / "train", "--captions", caps, "--index",
            env["index"], "--workers", "0")
    return root


@pytest.mark.parametrize("method", ["coder", "coder*", "adapter", "xmore", "coder+xmore"])
def test_every_method_served_and_explained_equals_the_cli(env, adapter_and_corpus, method):
    """For every method that can be served: /api/classify equals `classify`, and an explanation (the
    server's and `explain --json`'s) explains that prediction: the same method, class, scores and
    runner-up as the row."""
    root = adapter_and_corpus
    files = [env["photos"] / g for g in GOOD[:6]]
    extra = {"coder": [], "coder*": ["--rerank"], "adapter": ["--adapter", root / "adapter"],
             "xmore": ["--corpus", root / "corpus", "--method", "xmore"],
             "coder+xmore": ["--corpus", root / "corpus", "--method", "coder+xmore"]}[method]
    config = {"coder": ServeConfig(index=env["index"]), "coder*": ServeConfig(index=env["index"], rerank=True),
              "adapter": ServeConfig(index=env["index"], adapter=root / "adapter")}.get(method) or \
        ServeConfig(index=env["index"], corpus=root / "corpus", method=method)
    # the CLI over a folder holding exactly the uploaded images (X-MoRe normalises over the folder's)
    folder = root / f"only-{method.replace('+', '-').replace('*', 'star')}"
    folder.mkdir()
    for i, f in enumerate(files):
        (folder / f"{i:02d}{f.suffix}").write_bytes(f.read_bytes())
    out = root / f"{folder.name}.jsonl"
    llm = ["--llm", "none"] if method == "coder*" else []
    run_cli("classify", folder, "--index", env["index"], "--out", out, "--workers", "0", "-q", *extra, *llm)
    cli_rows = [json.loads(x) for x in out.read_text().splitlines()]
    cli_rows.sort(key=lambda r: r["path"])
    uploads = sorted(folder.iterdir())
    app = create_app(config)
    with BackgroundServer(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        rows = client.post("/api/classify", files=upload(*uploads)).json()
        why = client.post("/api/explain", files=upload(*uploads)).json()
        assert client.get("/api/info").json()["server"]["method"] == cli_rows[0]["method"]
    same_rows(rows, cli_rows)
    cli_why = json.loads(run_cli("explain", *uploads, "--index", env["index"], "--json", *extra))
    for explained in (why, cli_why):
        for w, r in zip(explained, rows, strict=True):
            assert w["method"] == r["method"] and w["prediction"] == r["label"], (w["prediction"], r)
            assert_same_ranking([c["class"] for c in w["classes"]], [c["score"] for c in w["classes"]],
                                [t["label"] for t in r["top_k"]], [t["score"] for t in r["top_k"]])
            assert w["runner_up"] == r["top_k"][1]["label"]
            assert ("captions" in w) == ("xmore" in method)
    for w, c in zip(why, cli_why, strict=True):
        w.pop("path"), c.pop("path")
        assert_close_tree(w, c)


def test_gap_threshold_preset_is_the_released_gate_of_the_index_dataset(env):
    from coder_index.core.presets import gap_threshold_preset

    app = create_app(ServeConfig(index=env["index"], rerank=True, gap_threshold="preset"))
    try:
        assert app.state.service.spec.gap_threshold == gap_threshold_preset("oxford_pets")
    finally:
        app.state.service.close()
