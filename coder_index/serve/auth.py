"""The server's token: no one in without it, when the server can be reached from other machines.

As Jupyter's server does: with a ``--host`` that is not loopback a token is required (given, or made
at start with ``secrets`` and printed once as the URL to open); on loopback it is optional.

* Every request is checked here, before routing (pages, static files, thumbnails, the API, the
  explanations, and paths that do not exist, alike): ``Authorization: Bearer TOKEN``, or the cookie
  the page got. A missing or wrong token is the same 401, with no data, whatever the route.
* ``?token=TOKEN`` on a GET (the URL printed at start) becomes an ``HttpOnly``, ``SameSite=Strict``
  cookie, and the answer redirects to the same URL without it, so that the token stays out of the
  browser's history and of ``Referer``.
* Tokens are compared in constant time (``hmac.compare_digest``), and never echoed, logged or
  written (the cookie is named per port: two servers on one host do not take each other's).
* Guessing is slowed, per client address: each failed attempt waits a little longer than the one
  before (50 ms, doubling, at most 2 s; forgotten after a minute without failure). A right token is
  never delayed, so no one is locked out by someone else's guesses.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl, urlencode

from starlette.responses import JSONResponse, Response

from coder_index.serve.guard import is_loopback

TOKEN_BYTES = 24            # 192 bits: what secrets.token_urlsafe makes at start
FIRST_DELAY = 0.05          # seconds before answering the first failed attempt of a client
MAX_DELAY = 2.0
FORGET_AFTER = 60.0         # seconds without a failure after which a client's count starts again
_UNAUTHORISED = {"detail": "unauthorised: this server needs its token (open the URL it printed at start, or send "
                           "Authorization: Bearer TOKEN)"}


def token_required(host: str) -> bool:
    """Whether a server bound to ``host`` must have a token: when it can be reached from elsewhere."""
    return not is_loopback(host)


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def cookie_name(port: int | None) -> str:
    return f"coder_index_token_{port or 0}"


class Throttle:
    """Failed attempts per client address, and how long to wait before answering the next one."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, *, first: float | None = None,
                 most: float | None = None) -> None:
        self.clock = clock
        # read at construction, not import, so that a test server can answer its many refusals quickly
        self.first = FIRST_DELAY if first is None else first
        self.most = MAX_DELAY if most is None else most
        self.failures: dict[str, tuple[int, float]] = {}  # client -> (failures, time of the last)

    def failed(self, client: str) -> float:
        """Count a failure of ``client``; the seconds to wait before answering it."""
        now = self.clock()
        count, last = self.failures.get(client, (0, now))
        if now - last > FORGET_AFTER:
            count = 0
        count += 1
        self.failures[client] = (count, now)
        if len(self.failures) > 10_000:  # bounded memory: the oldest clients are forgotten first
            for stale in sorted(self.failures, key=lambda c: self.failures[c][1])[:5_000]:
                del self.failures[stale]
        return min(self.most, self.first * 2 ** (count - 1))


class TokenCheck:
    """ASGI middleware: let through only requests that carry ``token`` (see the module docstring)."""

    def __init__(self, app: Any, token: str, *, throttle: Throttle | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.app, self._token = app, token.encode("utf-8")
        self.throttle = throttle or Throttle()
        self.sleep = sleep

    def _matches(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode("utf-8", "surrogateescape"), self._token)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
        port = (scope.get("server") or (None, None))[1]
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        offered = [v for k, v in query if k == "token"]
        if offered and scope.get("method") == "GET" and scope["type"] == "http":
            if self._matches(offered[-1]):  # the printed URL: a cookie, then the same URL without the token
                return await _redirect_with_cookie(scope, [(k, v) for k, v in query if k != "token"],
                                                   cookie_name(port), offered[-1])(scope, receive, send)
            return await self._refuse(scope, receive, send)
        if self._matches(_bearer(headers.get("authorization"))) or \
                self._matches(_cookie(headers.get("cookie"), cookie_name(port))):
            return await self.app(scope, receive, send)
        return await self._refuse(scope, receive, send)

    async def _refuse(self, scope: dict, receive: Any, send: Any) -> None:
        client = (scope.get("client") or ("?", 0))[0]
        await self.sleep(self.throttle.failed(client))
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        return await JSONResponse(_UNAUTHORISED, status_code=401,
                                  headers={"WWW-Authenticate": 'Bearer realm="coder-index"',
                                           "Cache-Control": "no-store"})(scope, receive, send)


def _bearer(value: str | None) -> str | None:
    if not value:
        return None
    kind, _, credentials = value.partition(" ")
    return credentials.strip() if kind.lower() == "bearer" else None


def _cookie(value: str | None, name: str) -> str | None:
    for part in (value or "").split(";"):
        key, _, val = part.strip().partition("=")
        if key == name:
            return val
    return None


def _redirect_with_cookie(scope: dict, query: list[tuple[str, str]], name: str, token: str) -> Response:
    raw = scope.get("raw_path")
    path = raw.decode("latin-1") if isinstance(raw, bytes) else scope.get("path") or "/"
    path = "/" + path.lstrip("/")  # never //host: a redirect stays on this server
    location = path + ("?" + urlencode(query) if query else "")
    response = Response(status_code=303, headers={"Location": location, "Cache-Control": "no-store"})
    response.set_cookie(name, token, httponly=True, samesite="strict", path="/")
    return response
