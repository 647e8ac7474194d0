"""serve under attack, over HTTP against running servers: no file from outside the root (a link
swapped in while requests run), no 500 whatever the predictions file becomes, no work for pages of
other origins, slow senders cut off, decoded pixels bounded, the whole loopback range treated as
loopback, secrets redacted by name and by value, security headers on every response."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")

import httpx  # noqa: E402
from PIL import Image  # noqa: E402

from coder_index.core.redaction import redact  # noqa: E402
from coder_index.pipeline.output import ResultWriter  # noqa: E402
from coder_index.serve import ServeConfig, create_app  # noqa: E402
from coder_index.serve.background import BackgroundServer  # noqa: E402
from coder_index.serve.budget import PixelBudget  # noqa: E402
from coder_index.serve.guard import is_loopback  # noqa: E402

from serve_env import make_serve_env  # noqa: E402


def _color_jpeg(path: Path, color: tuple[int, int, int], size: int = 64) -> None:
    Image.new("RGB", (size, size), color).save(path, "JPEG", quality=95)


def _rows(paths: list[str]) -> list[dict]:
    return [{"path": p, "label": "pug", "score": 0.9, "method": "coder",
             "top_k": [{"label": "pug", "score": 0.9}, {"label": "beagle", "score": 0.1}]} for p in paths]


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model):
    return make_serve_env(tmp_path_factory.mktemp("serve-sec"), tiny_model)


TOKEN = "sec-token-" + "Ab9" * 10
_AUTH: list[str | None] = [None]  # the token of the servers this test starts (the `auth` fixture's)
_CLIENT, _GET = httpx.Client, httpx.get


@pytest.fixture(autouse=True, params=[None, TOKEN], ids=["no-token", "token"])
def auth(request, monkeypatch):
    """Every test of this module twice: as before, and with the server's token required (serve/auth.py),
    which every client here then sends: the same defences hold behind the token."""
    import functools

    _AUTH[0] = request.param
    if request.param:
        headers = {"Authorization": f"Bearer {request.param}"}
        monkeypatch.setattr(httpx, "Client", functools.partial(_CLIENT, headers=headers))
        monkeypatch.setattr(httpx, "get", functools.partial(_GET, headers=headers))
    yield request.param
    _AUTH[0] = None


def auth_header() -> bytes:
    """The token's header line for a request written by hand on a socket (nothing without a token)."""
    return f"Authorization: Bearer {_AUTH[0]}\r\n".encode() if _AUTH[0] else b""


def serving(config: ServeConfig, host: str = "127.0.0.1"):
    from dataclasses import replace

    if _AUTH[0]:
        config = replace(config, token=_AUTH[0])
    app = create_app(config, bound_host=host)
    return app, BackgroundServer(app, host=host)


# ---------------------------------------------------------------------------------------------- 1. the race
def test_a_folder_swapped_for_a_link_out_of_the_root_never_serves_the_outside_file(env, tmp_path):
    """While a thread swaps photos/box (inside) with a symlink to a folder outside the root, for a
    bounded time, every answer for the listed image is the inside image or a refusal, never the
    outside one (thumbnails compared by colour; explanations by what the inside image gives)."""
    root = tmp_path / "root"
    box = root / "box"
    box.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    _color_jpeg(box / "img.jpg", (250, 0, 0))       # inside: red
    _color_jpeg(outside / "img.jpg", (0, 0, 250))   # outside: blue
    preds = root / "p.csv"
    w = ResultWriter(preds, 2)
    w.write(_rows(["box/img.jpg"]))
    w.close()
    app, srv = serving(ServeConfig(index=env["index"], predictions=preds, images_root=root))
    stop = threading.Event()
    swaps = [0]

    def swapper() -> None:
        real = root / "box.real"
        while not stop.is_set():
            os.rename(box, real)
            os.symlink(outside, box)
            time.sleep(0.0005)
            os.unlink(box)
            os.rename(real, box)
            swaps[0] += 1
            time.sleep(0.0005)  # as long inside as outside: both states are met by requests

    with srv as url, httpx.Client(base_url=url, timeout=60) as client:
        t = threading.Thread(target=swapper)
        t.start()
        colours, refused = [], 0
        deadline = time.monotonic() + 8  # bounded in time
        try:
            while time.monotonic() < deadline:
                res = client.get("/api/predictions/image", params={"row": 0, "size": 128})
                if res.status_code == 200:
                    colours.append(np.asarray(Image.open(io.BytesIO(res.content))).reshape(-1, 3).mean(0))
                else:
                    assert res.status_code in (403, 404, 422), res.text
                    refused += 1
        finally:
            stop.set()
            t.join()
        # the folder back in place for good: served (so the checks above ran on the serving path)
        res = client.get("/api/predictions/image", params={"row": 0, "size": 128})
        assert res.status_code == 200, res.text
        colours.append(np.asarray(Image.open(io.BytesIO(res.content))).reshape(-1, 3).mean(0))
    assert swaps[0] > 50 and len(colours) + refused > 20, (swaps, len(colours), refused)
    assert all(c[0] > 200 and c[2] < 60 for c in colours), "an image from outside the root was served"


# ---------------------------------------------------------------------------------------------- 2, 3. file states
def _damage(kind: str, preds: Path) -> None:
    if kind == "deleted":
        preds.unlink()
    elif kind == "directory":
        preds.unlink()
        preds.mkdir()
    elif kind == "fifo":
        preds.unlink()
        os.mkfifo(preds)
    elif kind == "truncated":
        data = preds.read_bytes()
        preds.write_bytes(data[: len(data) // 2])
    elif kind == "garbage-line":
        with open(preds, "ab") as f:
            f.write(b"this is not a row\n{\"path\": 1}\n" if preds.suffix == ".jsonl" else b'garbage,x\n"1","2"\n')
    elif kind == "replaced":
        preds.unlink()
        preds.write_bytes(b"\x00\xff not a predictions file at all\n")
    elif kind == "empty":
        preds.write_bytes(b"")


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
@pytest.mark.parametrize("kind", ["deleted", "directory", "fifo", "truncated", "garbage-line", "replaced", "empty"])
def test_every_state_of_the_predictions_file_is_a_4xx_or_a_page_never_a_500(env, tmp_path, fmt, kind):
    root = env["root"]
    preds = tmp_path / f"p.{fmt}"
    w = ResultWriter(preds, 2)
    w.write(_rows(["photos/a/red_0.jpg", "photos/gray.png", "photos/b/blue_0.jpg"]))
    w.close()
    app, srv = serving(ServeConfig(index=env["index"], predictions=preds, images_root=root))
    with srv as url, httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/api/predictions/summary").json()["rows"] == 3
        _damage(kind, preds)
        answers = {p: client.get(p, params=q) for p, q in (("/api/predictions", {}), ("/api/predictions/summary", {}),
                                                            ("/api/predictions/image", {"row": 0}),
                                                            ("/api/predictions/explain", {"row": 0}))}
        for p, res in answers.items():
            assert res.status_code < 500, (kind, p, res.text)
            assert res.headers["content-type"].startswith(("application/json", "image/jpeg")), (kind, p)
        summary = answers["/api/predictions/summary"]
        if kind in ("deleted", "directory", "fifo"):   # the rows already read are kept, and the page says why
            assert summary.status_code == 200 and summary.json()["rows"] == 3 and summary.json()["problem"]
            assert answers["/api/predictions/image"].status_code == 200
        if kind == "garbage-line":                      # good rows served, bad lines counted
            body = summary.json()
            assert body["rows"] == 3 and body["bad_lines"] >= 1, body
            assert answers["/api/predictions"].json()["total"] == 3
            assert answers["/api/predictions/image"].status_code == 200
        assert client.get("/api/info").status_code == 200  # still serving


# ---------------------------------------------------------------------------------------------- 4. origins
def test_pages_of_other_origins_cannot_make_the_server_work(env):
    app, srv = serving(ServeConfig(index=env["index"], predictions=env["preds"], images_root=env["root"]))
    img = (env["photos"] / "a" / "red_0.jpg").read_bytes()
    files = [("files", ("r.jpg", img, "image/jpeg"))]
    with srv as url, httpx.Client(base_url=url, timeout=60) as client:
        service = app.state.service

        def images() -> int:
            return service.worker.images

        before = images()
        for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"},
                        {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"},
                        {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "cors", "Origin": "http://a.localhost:1"},
                        {"Origin": url.replace("127.0.0.1", "localhost")}):
            for method, path, kw in (("POST", "/api/classify", {"files": files}),
                                     ("POST", "/api/explain", {"files": files}),
                                     ("GET", "/api/texts", {"params": {"q": "cat"}}),
                                     ("GET", "/api/predictions/image", {"params": {"row": 0}}),
                                     ("GET", "/api/info", {})):
                res = client.request(method, path, headers=headers, **kw)
                assert res.status_code == 403, (headers, path, res.status_code)
                assert "refused" in res.json()["detail"]
        assert images() == before, "the model ran for another origin"
        # the server's own page, and clients that are not browsers, are served
        own = {"Origin": url, "Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors"}
        assert client.post("/api/classify", files=files, headers=own).status_code == 200
        assert client.post("/api/classify", files=files).status_code == 200
        nav = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}
        assert client.get("/", headers=nav).status_code == 200  # a link to the page from elsewhere opens it
        assert images() == before + 2


# ---------------------------------------------------------------------------------------------- 5. slow senders
def _open(url: str) -> socket.socket:
    host, port = url.split("//")[1].split(":")
    return socket.create_connection((host, int(port)), timeout=5)


def _closed(sock: socket.socket, within: float) -> bool:
    """Whether the server closes ``sock`` within ``within`` seconds (reads until EOF or reset)."""
    sock.settimeout(0.2)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if sock.recv(65536) == b"":
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False


def test_slow_senders_are_cut_off_and_connections_capped(env):
    config = ServeConfig(index=env["index"], header_timeout=1.0, body_timeout=2.0, max_connections=60)
    app, srv = serving(config)
    with srv as url:
        # 40 connections trickling their headers, one byte each 0.25 s: all closed after ~1 s
        socks = [_open(url) for _ in range(40)]
        for step in range(4):
            for s in socks:
                try:
                    s.send(b"GET /api/info HTTP/1.1\r\n"[step:step + 1])
                except OSError:
                    pass
            time.sleep(0.25)
        assert all(_closed(s, within=4) for s in socks), "a header trickler was not cut off"
        for s in socks:
            s.close()
        # a body trickling 4 bytes per 0.25 s: cut off after the body timeout, though every chunk is on time
        s = _open(url)
        s.send(b"POST /api/classify HTTP/1.1\r\nHost: 127.0.0.1\r\n" + auth_header() +
               b"Content-Type: multipart/form-data; boundary=x\r\n"
               b"Content-Length: 100000\r\n\r\n")
        cut = False
        for _ in range(40):  # bounded: 10 s
            try:
                s.send(b"abcd")
            except OSError:
                cut = True
                break
            if _closed(s, within=0.25):
                cut = True
                break
        assert cut, "a body trickler was not cut off before it was done (100,000 bytes at 4 per 0.25 s)"
        s.close()
        # the connection cap: past max_connections, a new connection is closed at once
        held = [_open(url) for _ in range(60)]
        time.sleep(0.3)
        extra = _open(url)
        assert _closed(extra, within=2)
        for h in held:
            h.close()
        extra.close()
        time.sleep(0.3)
        assert httpx.get(url + "/api/info", timeout=30).status_code == 200  # and the server still serves


# ---------------------------------------------------------------------------------------------- 6. memory
def _black_png(megapixels: int) -> bytes:
    side = int((megapixels * 1_000_000) ** 0.5)
    buf = io.BytesIO()
    Image.new("RGB", (side, side)).save(buf, "PNG", optimize=False, compress_level=9)
    return buf.getvalue()


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _serve_process(env: dict, *args: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "coder_index_cli.main", "serve", str(env["index"]), "--port", "0",
                             *args], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    deadline = time.time() + 120
    line = ""
    while "serving" not in line and time.time() < deadline and proc.poll() is None:
        line = proc.stderr.readline()
    assert "serving" in line, line
    return proc, line.split(" at ")[1].split("/ ")[0]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS is read from /proc (Linux)")
def test_decoded_pixels_are_bounded_across_requests(env, tmp_path):
    """16 black 36-megapixel PNGs (a few hundred KiB on the wire) in 4 concurrent requests: the
    server's peak RSS grows by little more than one decoded image, not by 16 of them; a listed
    image over --max-megapixels is refused and a 36 MP JPEG's thumbnail is decoded reduced."""
    png = _black_png(36)
    assert len(png) < 200_000
    big_jpeg = tmp_path / "big.jpg"
    Image.new("RGB", (6000, 6000), (10, 200, 10)).save(big_jpeg, "JPEG", quality=80)
    huge = tmp_path / "huge.jpg"
    Image.new("RGB", (7100, 7100), (10, 200, 10)).save(huge, "JPEG", quality=60)
    preds = tmp_path / "p.csv"
    w = ResultWriter(preds, 2)
    w.write(_rows(["big.jpg", "huge.jpg"]))
    w.close()
    proc, url = _serve_process(env, "--predictions", str(preds), "--images-root", str(tmp_path),
                               "--max-megapixels", "40", "--max-upload-mb", "5")
    try:
        with httpx.Client(base_url=url, timeout=600) as client:
            client.post("/api/classify", files=[("files", ("w.jpg", _jpeg_small(), "image/jpeg"))])  # warm
            base = _peak_rss(proc.pid)
            res = client.get("/api/predictions/image", params={"row": 0, "size": 256})
            assert res.status_code == 200
            one_image = 36_000_000 * 3
            assert _peak_rss(proc.pid) - base < one_image // 2, "the thumbnail decoded the whole photo"
            base = _peak_rss(proc.pid)
            errors: list[str] = []

            def send() -> None:
                res = client.post("/api/classify", files=[("files", (f"b{i}.png", png, "image/png")) for i in range(4)])
                if res.status_code != 200:
                    errors.append(res.text)

            threads = [threading.Thread(target=send) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not errors, errors
            grown = _peak_rss(proc.pid) - base
            assert grown < 4 * one_image, f"peak RSS grew by {grown / 1e6:.0f} MB"  # 16 decoded: 1.7 GB
            res = client.get("/api/predictions/image", params={"row": 1})
            assert res.status_code == 413 and "40,000,000" in res.json()["detail"]
            assert client.get("/api/predictions/explain", params={"row": 1}).status_code == 413
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _jpeg_small() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, "JPEG")
    return buf.getvalue()


def test_pixel_budget_never_lends_more_than_it_has():
    budget = PixelBudget(100)
    inside = []

    def work(n: int) -> None:
        with budget.hold(n):
            inside.append(budget.held)
            time.sleep(0.01)

    threads = [threading.Thread(target=work, args=(n,)) for n in (60, 50, 40, 30, 500, 20) * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(inside) <= 100 and budget.peak <= 100 and budget.held == 0


# ---------------------------------------------------------------------------------------------- 7. loopback
@pytest.mark.parametrize("host,loop", [("127.0.0.1", True), ("127.0.0.2", True), ("127.255.255.254", True),
                                       ("localhost", True), ("::1", True), ("[::1]", True), ("0.0.0.0", False),
                                       ("10.0.0.1", False), ("example.com", False), ("128.0.0.1", False)])
def test_the_whole_loopback_range_is_loopback(host, loop):
    assert is_loopback(host) == loop


def test_a_server_on_127_0_0_2_keeps_the_host_check_and_no_warning(env):
    import uvicorn
    from click.testing import CliRunner

    from coder_index_cli.main import cli

    ran = []
    orig = uvicorn.Server.run
    try:
        uvicorn.Server.run = lambda self, sockets=None: ran.append(sockets)
        res = CliRunner().invoke(cli, ["serve", str(env["index"]), "--host", "127.0.0.2", "--port", "0"])
    finally:
        uvicorn.Server.run = orig
    assert res.exit_code == 0 and ran and "WARNING" not in res.stderr and "not loopback" not in res.stderr
    app, srv = serving(ServeConfig(index=env["index"]), host="127.0.0.2")
    with srv as url, httpx.Client(base_url=url, timeout=30) as client:
        port = url.rsplit(":", 1)[1]
        assert client.get("/api/info").status_code == 200
        assert client.get("/api/info", headers={"host": f"127.0.0.9:{port}"}).status_code == 200
        assert client.get("/api/info", headers={"host": f"attacker.example:{port}"}).status_code == 400
        assert client.get("/api/info", headers={"host": "127.0.0.2.attacker.example"}).status_code == 400


# ---------------------------------------------------------------------------------------------- 8. redaction
SECRET = "sk-live-Zq7v0b1Xk9Lm2Np4Rs6Tu8Wy"


def test_secrets_are_redacted_by_name_and_by_value(env, tmp_path, monkeypatch):
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-4f9a8b7c6d5e")
    report = tmp_path / "report"
    shutil.copytree(env["report"], report)
    data = json.loads((report / "report.json").read_text())
    data["settings"] = {"X-Api-Key": "plain-value-1", "openai_key": "plain-value-2", "Authorization": "Basic abc",
                        "endpoint": "https://user:hunter2@llm.example/v1", "proxy": "http://tokenvalue@proxy:3128",
                        "note": f"used key {SECRET} and Bearer abc.def.ghi", "env": "tok-4f9a8b7c6d5e",
                        "random": "Qm9vbGVhbjEyMzQ1Njc4OTBBQkNEZWZnaGlq", "token_count": 3,
                        "weights_sha256": "ab" * 32, "data": "/data/Images/ILSVRC2012_val_00000001"}
    (report / "report.json").write_text(json.dumps(data))
    app, srv = serving(ServeConfig(index=env["index"], report=report))
    with srv as url, httpx.Client(base_url=url, timeout=30) as client:
        got = client.get("/api/report").json()["settings"]
        text = client.get("/api/report").text
    for secret in ("plain-value-1", "plain-value-2", "Basic abc", "hunter2", "tokenvalue", SECRET, "abc.def.ghi",
                   "tok-4f9a8b7c6d5e", "Qm9vbGVhbjEyMzQ1Njc4OTBBQkNEZWZnaGlq"):
        assert secret not in text, secret
    assert got["endpoint"] == "https://<redacted>@llm.example/v1" and got["token_count"] == 3
    assert got["weights_sha256"] == "ab" * 32 and got["data"] == "/data/Images/ILSVRC2012_val_00000001"
    assert redact({"nested": [{"api-key": "v"}]}) == {"nested": [{"api-key": "<redacted>"}]}


# ---------------------------------------------------------------------------------------------- 9. headers
def test_every_response_carries_the_security_headers(env):
    app, srv = serving(ServeConfig(index=env["index"], max_files=1, max_file_bytes=1000))
    with srv as url, httpx.Client(base_url=url, timeout=30) as client:
        port = url.rsplit(":", 1)[1]
        answers = [client.get("/api/info", headers={"host": f"evil.example:{port}"}),              # 400 Host
                   client.post("/api/classify", content=b"x" * 10_000_000,
                               headers={"content-type": "multipart/form-data; boundary=b"}),      # 413 body
                   client.post("/api/classify", files=[("files", ("a.jpg", b"x", "image/jpeg"))] * 2),  # 413 count
                   client.get("/api/info", headers={"Origin": "http://evil.example"}),             # 403 origin
                   client.get("/nope"), client.get("/api/info"), client.get("/")]                 # 404, 200s
        statuses = [r.status_code for r in answers]
        assert statuses[:5] == [400, 413, 413, 403, 404], statuses
        for r in answers:
            assert r.headers.get("x-content-type-options") == "nosniff", r.status_code
            assert "default-src 'self'" in r.headers.get("content-security-policy", ""), r.status_code
