"""serve's token, tried as an outsider would: when a token is required, every route (pages, static
files, thumbnails, the API, explanations, paths that do not exist) refuses a request without it, with a
wrong one and with another server's, the same way; the printed URL's ?token= becomes an HttpOnly,
SameSite=Strict cookie and is taken out of the address; the token is written nowhere but the start-up
line; failed attempts are slowed per client, never the right token. Every server here listens on
loopback; one bound to 0.0.0.0 is reached only through 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time

import pytest

pytest.importorskip("fastapi", reason="serve needs its extra: pip install -e '.[serve]'")

import httpx  # noqa: E402

from coder_index.serve import ServeConfig, auth, create_app  # noqa: E402
from coder_index.serve.auth import Throttle, TokenCheck, token_required  # noqa: E402
from coder_index.serve.background import BackgroundServer  # noqa: E402

from serve_env import make_serve_env  # noqa: E402

TOKEN = "tok-" + "Zq8" * 12
OTHER = "tok-" + "Xy7" * 12


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model):
    return make_serve_env(tmp_path_factory.mktemp("serve-token"), tiny_model)


@pytest.fixture(scope="module")
def server(env):
    app = create_app(ServeConfig(index=env["index"], predictions=env["preds"], images_root=env["root"],
                                 report=env["report"], token=TOKEN))
    # the refusals below come from one client: answer them without the growing delay (tested on its own)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(auth, "FIRST_DELAY", 0.0)
        mp.setattr(auth, "MAX_DELAY", 0.0)
        with BackgroundServer(app) as url:
            yield url, app


def routes(app) -> list[tuple[str, str]]:  # noqa: ANN001 - the FastAPI app
    """(method, path) of every route the app has, its static files and a path it does not have."""
    out = [("GET", "/"), ("GET", "/static/app.js"), ("GET", "/static/app.css"), ("GET", "/no/such/path"),
           ("GET", "/api/no-such-route"), ("POST", "/api/no-such-route")]
    for r in app.routes:
        for method in sorted(getattr(r, "methods", None) or ()):
            if method != "HEAD" and "{" not in r.path:
                out.append((method, r.path))
    return sorted(set(out))


def test_a_token_is_required_exactly_when_the_server_can_be_reached_from_elsewhere():
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"):
        assert not token_required(host), host
    for host in ("0.0.0.0", "::", "192.168.1.20", "10.0.0.5", "gpu-box.example.org", "[2001:db8::1]"):
        assert token_required(host), host


def test_every_route_refuses_without_the_token_the_same_way(server):
    url, app = server
    paths = routes(app)
    assert len(paths) >= 12 and ("POST", "/api/classify") in paths and ("GET", "/api/predictions/image") in paths
    refusals = set()
    with httpx.Client(base_url=url, timeout=60, follow_redirects=False) as client:
        for headers in ({}, {"Authorization": f"Bearer {OTHER}"}, {"Authorization": "Bearer"},
                        {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": f"Bearer {TOKEN[:-1]}"},
                        {"Authorization": f"Basic {TOKEN}"}, {"Cookie": f"coder_index_token_0={TOKEN}"},
                        {"Cookie": f"coder_index_token_{url.rsplit(':', 1)[1]}={OTHER}"}):
            for method, path in paths:
                res = client.request(method, path, headers=headers)
                assert res.status_code == 401, (method, path, headers, res.status_code)
                assert TOKEN not in res.text and OTHER not in res.text
                refusals.add(res.text)
        assert len(refusals) == 1  # the same answer, whatever the route, whether it exists or not
        # with the token, the routes answer (a GET of each answers something other than 401)
        ok = {"Authorization": f"Bearer {TOKEN}"}
        for method, path in paths:
            if method == "GET":
                assert client.get(path, headers=ok).status_code != 401, path
        assert client.get("/api/info", headers=ok).status_code == 200
        assert client.get("/api/predictions/image", params={"row": 0, "size": 128}, headers=ok).status_code == 200
        assert client.get("/api/predictions/explain", params={"row": 0}, headers=ok).status_code == 200


def test_the_printed_url_sets_a_strict_http_only_cookie_and_leaves_the_address(server):
    url, _ = server
    with httpx.Client(base_url=url, timeout=60, follow_redirects=False) as client:
        res = client.get("/", params={"token": TOKEN, "view": "predictions"})
        assert res.status_code == 303 and res.headers["location"] == "/?view=predictions"
        cookie = res.headers["set-cookie"]
        port = url.rsplit(":", 1)[1]
        assert cookie.startswith(f"coder_index_token_{port}=")
        assert re.search(r";\s*HttpOnly", cookie, re.I) and re.search(r";\s*SameSite=strict", cookie, re.I)
        assert re.search(r";\s*Path=/", cookie)
        page = client.get("/?view=predictions", headers={"Cookie": cookie.split(";", 1)[0]})
        assert page.status_code == 200 and TOKEN not in page.text  # the page never holds the token
        info = client.get("/api/info", headers={"Cookie": cookie.split(";", 1)[0]})
        assert info.status_code == 200 and TOKEN not in info.text
        # a wrong ?token= sets nothing; a redirect never leaves the server
        bad = client.get("/", params={"token": OTHER})
        assert bad.status_code == 401 and "set-cookie" not in bad.headers
        away = client.get("//evil.example/x", params={"token": TOKEN})
        assert away.status_code == 303 and away.headers["location"].startswith("/") and \
            not away.headers["location"].startswith("//")


def test_failed_attempts_are_slowed_per_client_and_the_right_token_never_is():
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    async def app(scope, receive, send):  # noqa: ANN001
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"in"})

    first, most = 0.05, 2.0  # the defaults, given here: the server fixture above may have set others
    assert (Throttle().first, Throttle().most) == (auth.FIRST_DELAY, auth.MAX_DELAY)
    check = TokenCheck(app, TOKEN, throttle=Throttle(first=first, most=most), sleep=sleep)

    async def ask(client: str, token: str | None) -> int:
        sent = []

        async def send(message):  # noqa: ANN001
            sent.append(message)

        headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
        scope = {"type": "http", "method": "GET", "path": "/api/info", "headers": headers, "query_string": b"",
                 "client": (client, 5000), "server": ("127.0.0.1", 8000)}
        await check(scope, None, send)
        return sent[0]["status"]

    async def scenario() -> None:
        for _ in range(8):
            assert await ask("10.0.0.9", OTHER) == 401
        assert waits == [min(most, first * 2 ** n) for n in range(8)]  # growing, bounded
        assert await ask("10.0.0.9", TOKEN) == 200 and len(waits) == 8  # the right token: never delayed
        assert await ask("10.0.0.7", None) == 401 and waits[-1] == first  # another client: its own count

    asyncio.run(scenario())
    clock = [0.0]
    throttle = Throttle(clock=lambda: clock[0], first=first, most=most)
    assert [throttle.failed("a") for _ in range(3)] == [first, first * 2, first * 4]
    clock[0] = 61.0  # a minute without a failure: the count starts again
    assert throttle.failed("a") == first


def test_a_server_on_0_0_0_0_requires_a_token_printed_once_and_nowhere_else(env, tmp_path):
    """The CLI on 0.0.0.0 (reached through 127.0.0.1 only): a token is made and printed once as the URL to
    open; without it nothing is served; with it everything is; nothing else it writes holds the token."""
    cmd = [sys.executable, "-m", "coder_index_cli.main", "-v", "serve", str(env["index"]), "--host", "0.0.0.0",
           "--port", "0", "--predictions", str(env["preds"]), "--images-root", str(env["root"])]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={k: v for k, v in os.environ.items() if k != "CODER_INDEX_SERVE_TOKEN"})
    lines: list[str] = []
    try:
        deadline = time.time() + 300
        while not any("?token=" in ln for ln in lines) and time.time() < deadline and proc.poll() is None:
            lines.append(proc.stderr.readline())
        opened = next(ln for ln in lines if "?token=" in ln)
        port, token = re.search(r":(\d+)/\?token=([A-Za-z0-9_-]+)", opened).groups()
        assert len(token) >= 22  # at least 128 bits, url-safe
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=60) as client:
            assert client.get("/api/info").status_code == 401
            assert client.get("/api/info", headers={"Authorization": f"Bearer {token}"}).status_code == 200
            rows = client.get("/api/predictions", headers={"Authorization": f"Bearer {token}"}).json()["rows"]
            assert rows
            client.get("/", params={"token": token}, follow_redirects=False)
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=60)
    written = "".join(lines) + err + out
    assert written.count(token) == 1, written  # the start-up line, once: not in logs, access lines, errors


def test_no_token_is_said_out_loud_and_loopback_needs_none(env, tmp_path):
    from conftest import run_cli

    res = run_cli("serve", env["index"], "--host", "0.0.0.0", "--token", TOKEN, "--no-token", ok=False)
    assert res.exit_code == 2 and "--token and --no-token" in res.output
    res = run_cli("serve", env["index"], "--token", "  ", ok=False)
    assert res.exit_code == 2 and "empty" in res.output
