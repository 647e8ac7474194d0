"""What stands between the network and the app: loopback and Host checks, refusal of requests from
other origins, security headers on every response, and time and connection limits for slow clients.

* **Host** (DNS rebinding): bound to a loopback address, only requests addressed to a loopback name
  (``localhost`` or any address of 127.0.0.0/8 or ::1) are answered.
* **Origin** (cross-site requests): a request a browser makes for a page of another origin carries
  ``Sec-Fetch-Site: cross-site`` (or ``same-site``) or an ``Origin`` that is not this server's; it is
  refused with 403 before the app runs, whatever its method (a ``no-cors`` POST cannot make the model
  work, an ``<img>`` elsewhere cannot pull listed images). A top-level navigation to the page is let
  through. Clients that are not browsers (curl, scripts) send neither header and are served.
* **Headers**: every response, the refusals of these layers included, carries the CSP and nosniff.
* **Slow clients**: the request line and headers must arrive within ``header_timeout`` seconds of the
  connection's first byte (or of the previous response), the whole body within ``body_timeout``;
  a client that trickles is disconnected. At most ``max_connections`` connections are open at once;
  one more is closed at once.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import h11
from starlette.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"content-security-policy",
     b"default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'"),
    (b"referrer-policy", b"no-referrer"),
]
HEADER_TIMEOUT = 10.0
BODY_TIMEOUT = 120.0
MAX_CONNECTIONS = 256


def is_loopback(host: str) -> bool:
    """``localhost`` or an address of the loopback range (127.0.0.0/8, ::1), with or without brackets."""
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _host_name(host: str) -> str:
    """The name of a Host header without its port (``[::1]:80`` -> ``[::1]``)."""
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class HostCheck:
    """Bound to loopback, answer only requests addressed to a loopback name: a web page elsewhere
    cannot reach the API through DNS rebinding."""

    def __init__(self, app: Any, loopback_only: bool) -> None:
        self.app, self.loopback_only = app, loopback_only

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.loopback_only:
            host = _header(scope, b"host")
            if not is_loopback(_host_name(host)):
                return await JSONResponse({"detail": f"host {host!r} is not served (bound to loopback)"},
                                          status_code=400)(scope, receive, send)
        return await self.app(scope, receive, send)


class OriginCheck:
    """Refuse what a page of another origin makes a browser send (see the module docstring)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            why = cross_origin(scope)
            if why:
                return await JSONResponse({"detail": f"refused: {why}; this server answers its own page and "
                                                     "clients that are not browsers"},
                                          status_code=403)(scope, receive, send)
        return await self.app(scope, receive, send)


def cross_origin(scope: dict) -> str | None:
    """Why a request comes from another origin's page, or None."""
    site = _header(scope, b"sec-fetch-site").lower()
    mode = _header(scope, b"sec-fetch-mode").lower()
    navigation = scope.get("method") == "GET" and mode == "navigate" and _header(scope, b"sec-fetch-dest") in (
        "document", "")
    if site in ("cross-site", "same-site") and not navigation:
        return f"a request from another site (Sec-Fetch-Site: {site})"
    origin = _header(scope, b"origin")
    if origin and origin != "null":
        own = f"{scope.get('scheme', 'http')}://{_header(scope, b'host')}".lower()
        if origin.lower().rstrip("/") != own:
            return f"a request from the page of another origin ({origin})"
    elif origin == "null":
        return "a request from an opaque origin (a sandboxed page or a file)"
    return None


class SecurityHeaders:
    """Outermost layer: every response, however it was made, carries the security headers."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    (k, v) for k, v in SECURITY_HEADERS if k not in names]
            await send(message)

        await self.app(scope, receive, with_headers)


def _header(scope: dict, name: bytes) -> str:
    for k, v in scope.get("headers") or []:
        if k == name:
            return v.decode("latin-1")
    return ""


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for a request's headers and one for its body, and a cap
    on open connections (uvicorn itself waits for a trickling client forever)."""

    header_timeout = HEADER_TIMEOUT
    body_timeout = BODY_TIMEOUT
    max_connections = MAX_CONNECTIONS

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: Any = None
        self._phase: str | None = None
        if len(self.connections) > self.max_connections:
            transport.close()  # one connection too many: refused at once, before a byte is read
            return
        self._arm("headers", self.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._phase is None and (self.cycle is None or self.cycle.response_complete):
            self._arm("headers", self.header_timeout)  # the first bytes of the next request on this connection
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow()

    def _follow(self) -> None:
        state = self.conn.their_state
        if self._phase == "headers" and state is h11.SEND_BODY:
            self._arm("body", self.body_timeout)
        elif self._phase is not None and state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR):
            self._disarm()
        elif self._phase == "headers" and state is h11.IDLE and self.cycle is not None \
                and not self.cycle.response_complete:
            self._disarm()

    def _arm(self, phase: str, seconds: float) -> None:
        self._disarm()
        self._phase = phase
        self._deadline = self.loop.call_later(seconds, self._too_slow)

    def _disarm(self) -> None:
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()
        self._deadline, self._phase = None, None

    def _too_slow(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.logger.info("closing a connection whose request's %s did not arrive in time", self._phase)
            self.transport.close()


def protocol_class(header_timeout: float, body_timeout: float, max_connections: int) -> type[GuardedH11Protocol]:
    return type("ServeH11Protocol", (GuardedH11Protocol,), {"header_timeout": header_timeout,
                                                           "body_timeout": body_timeout,
                                                           "max_connections": max_connections})
